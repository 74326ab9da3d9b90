"""Content-addressed, immutable code bundles: a local folder now, any blob store behind one API."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from pathlib import Path

from workers import WorkerError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobError(WorkerError):
    """A blob is missing or cannot be stored."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalBlobStore:
    """Blobs as files named by their SHA-256 under one folder, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not _DIGEST.match(key):
            raise BlobError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key

    async def put(self, data: bytes) -> str:
        key = digest(data)
        await asyncio.to_thread(self._write, key, data)
        return key

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise BlobError(f"cannot write blob {key[:12]} under {self.root}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise BlobError(f"blob {key[:12]} is missing from {self.root}") from exc
        if digest(data) != key:
            raise BlobError(f"blob {key[:12]} is corrupt")
        return data


class CodeCache:
    """Process-local cache of code by content hash: a hash never changes what it names."""

    def __init__(self, store: LocalBlobStore, max_entries: int = 256) -> None:
        self.store = store
        self.max_entries = max_entries
        self._entries: dict[str, str] = {}

    async def source(self, key: str) -> str:
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        text = (await self.store.get(key)).decode("utf-8")
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = text
        return text
