"""Sealed job payloads: what a call may read (env vars, the caller's secrets, BYOK keys) travels
through Redis encrypted with AES-GCM under the farm key, bound to the call it belongs to.

Keys come as a keyring ``id:base64key,...``; the first key seals, any listed key opens, so a farm
key can be rotated by listing the new key first everywhere, then dropping the old one. Without a
configured key, every process sharing a data folder shares one generated there (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

import orjson
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from config import Settings
from workers import WorkerError

log = structlog.get_logger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
JOB_AAD = b"ultralight/job/v1"


class SealingError(WorkerError):
    """A key is missing or malformed, or a payload cannot be opened; never names a secret."""


class Keyring:
    """AES-256 keys by id; the first one is current (used to encrypt)."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise SealingError("a keyring needs at least one key")
        self._keys = dict(keys)
        self.current_id = keys[0][0]
        self._aead = {key_id: AESGCM(key) for key_id, key in keys}

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise SealingError(f"no key with id {key_id!r} in the keyring") from None

    def aead(self, key_id: str) -> AESGCM:
        try:
            return self._aead[key_id]
        except KeyError:
            raise SealingError(f"no key with id {key_id!r} in the keyring") from None

    @classmethod
    def parse(cls, text: str, what: str) -> Keyring:
        """``id:base64key,...`` with 32-byte keys; ``what`` names the setting in errors."""
        keys: list[tuple[str, bytes]] = []
        for index, item in enumerate(part.strip() for part in text.split(",")):
            if not item:
                continue
            key_id, sep, encoded = item.partition(":")
            if not sep or not KEY_ID.match(key_id):
                raise SealingError(f"{what}: entry {index + 1} must be 'id:base64key' with an id "
                                   "of letters, digits, '-' or '_'")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise SealingError(f"{what}: the key {key_id!r} is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise SealingError(f"{what}: the key {key_id!r} must be {KEY_BYTES} bytes")
            if any(existing == key_id for existing, _ in keys):
                raise SealingError(f"{what}: the key id {key_id!r} appears twice")
            keys.append((key_id, key))
        return cls(keys)


def new_key_entry(prefix: str = "k") -> str:
    """A fresh ``id:base64key`` entry, for a keyring setting or a local key file."""
    key = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()
    return f"{prefix}{secrets.token_hex(4)}:{key}"


def load_keyring(configured: str, data_dir: Path, file_name: str, what: str) -> Keyring:
    """The configured keyring, or one generated once in ``data_dir`` and shared from there."""
    if configured.strip():
        return Keyring.parse(configured, what)
    path = data_dir / file_name
    if not path.exists():
        _create_key_file(path)
        log.warning("generated_local_key", setting=what, path=str(path),
                    detail="set it explicitly when processes do not share this data folder")
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SealingError(f"cannot read the key file {path}: {exc.strerror}") from exc
    return Keyring.parse(text, str(path))


def _create_key_file(path: Path) -> None:
    """Write a key atomically: first writer wins, and no reader ever sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(new_key_entry("l") + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


@functools.lru_cache(maxsize=8)
def farm_keyring(settings: Settings) -> Keyring:
    """The keyring that seals and opens jobs (``ULTRALIGHT_FARM_KEY``)."""
    return load_keyring(settings.farm_key, settings.data_dir, "farm.key", "ULTRALIGHT_FARM_KEY")


# Sealed payloads.

@dataclasses.dataclass(frozen=True)
class SealedPayload:
    """What a call may use: env vars and the caller's secrets reach the sandbox, BYOK keys never."""

    env: dict[str, str] = dataclasses.field(default_factory=dict)
    secrets: dict[str, str] = dataclasses.field(default_factory=dict)
    byok: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.env or self.secrets or self.byok)

    def sandbox_env(self) -> dict[str, str]:
        """The app's env vars overlaid with the caller's secrets; provider keys stay out."""
        return {**self.env, **self.secrets}


def job_aad(call_id: str, app_id: str, user_id: str | None) -> bytes:
    return b"\0".join((JOB_AAD, call_id.encode(), app_id.encode(), (user_id or "").encode()))


def seal(keyring: Keyring, payload: SealedPayload, aad: bytes) -> str:
    """``keyid.base64(nonce + ciphertext)``: JSON-safe, and useless without the farm key."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    plain = orjson.dumps(dataclasses.asdict(payload))
    sealed = keyring.aead(keyring.current_id).encrypt(nonce, plain, aad)
    return f"{keyring.current_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"


def open_sealed(keyring: Keyring, token: str, aad: bytes) -> SealedPayload:
    key_id, _, encoded = token.partition(".")
    try:
        raw = base64.urlsafe_b64decode(encoded)
        plain = keyring.aead(key_id).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
        data = orjson.loads(plain)
    except SealingError:
        raise SealingError(f"the call was sealed with farm key {key_id!r}, which this worker "
                           "does not have; give every gateway and worker the same "
                           "ULTRALIGHT_FARM_KEY") from None
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise SealingError("the call's sealed payload does not open with this worker's farm "
                           "key or belongs to another call") from exc
    return SealedPayload(**{k: dict(data.get(k) or {}) for k in ("env", "secrets", "byok")})


class ProviderKeys:
    """Each running call's BYOK keys, held by the worker for its own use, never the sandbox's."""

    def __init__(self) -> None:
        self._by_call: dict[str, Mapping[str, str]] = {}

    @contextlib.contextmanager
    def holding(self, call_id: str, keys: Mapping[str, str]) -> Iterator[None]:
        self._by_call[call_id] = dict(keys)
        try:
            yield
        finally:
            self._by_call.pop(call_id, None)

    def get(self, call_id: str, provider: str) -> str | None:
        return self._by_call.get(call_id, {}).get(provider)

    def __len__(self) -> int:
        return len(self._by_call)


PROVIDER_KEYS = ProviderKeys()
