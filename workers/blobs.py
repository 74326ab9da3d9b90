"""Content-addressed, immutable code bundles, in a local folder (embedded) or S3, R2 or MinIO.

Both stores name a blob by the SHA-256 of its bytes, never overwrite one, and check the bytes
against that name when they read them back. `open_blob_store` picks one from the settings.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from config import Settings
from workers import WorkerError

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Loose on purpose: AWS, R2 and MinIO differ in the details; the server has the last word.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30
S3_MAX_ATTEMPTS = 3
_REFUSED = ("401", "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class BlobError(WorkerError):
    """A blob is missing or cannot be stored, or the blob store cannot be used at all."""


class BlobStore(Protocol):
    """What the code cache and deploys need from a blob store."""

    async def check(self) -> None: ...

    async def put(self, data: bytes) -> str: ...

    async def get(self, key: str) -> bytes: ...


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _DIGEST.match(key):
        raise BlobError(f"not a blob key: {key!r}")
    return key


class LocalBlobStore:
    """Blobs as files named by their SHA-256 under one folder, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / key[:2] / key

    async def check(self) -> None:
        """Create the folder if needed, or say why it cannot be used."""
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobError(f"cannot use the blob folder {self.root}: {exc}") from exc

    async def put(self, data: bytes) -> str:
        """Store `data` unless it is there already; returns its key, the SHA-256 in hex."""
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
        """The bytes stored under `key`, checked against it."""
        path = self._path(key)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as exc:
            raise BlobError(f"blob {key[:12]} is missing from {self.root}") from exc
        if digest(data) != key:
            raise BlobError(f"blob {key[:12]} is corrupt")
        return data


class S3BlobStore:
    """Blobs as objects named by their SHA-256 under a bucket and prefix, through boto3.

    boto3 blocks, so each request runs in a thread. An upload carries its SHA-256 for the server to
    verify, and is skipped when the object exists (same name, same bytes). The secret key lives
    only inside the boto3 client and is blanked out of every error message. boto3 is imported on
    first use, so processes on a local folder do not pay for it.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
    ) -> None:
        if not _BUCKET.match(bucket):
            raise BlobError(f"{bucket[:80]!r} is not an S3 bucket name")
        if bool(access_key_id) != bool(secret_access_key):
            raise BlobError(
                "set both ULTRALIGHT_S3_ACCESS_KEY_ID and ULTRALIGHT_S3_SECRET_ACCESS_KEY, or "
                "neither to let boto3 find credentials itself"
            )
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        endpoint = f" at {endpoint_url}" if endpoint_url else ""
        self.where = f"s3://{bucket}/{self.prefix}{endpoint}"
        self._secret = secret_access_key
        self._client = self._connect(endpoint_url, region, access_key_id)

    def _connect(self, endpoint_url: str, region: str, access_key_id: str) -> Any:
        from botocore.exceptions import BotoCoreError

        try:
            return _s3_client(endpoint_url, region, access_key_id, self._secret)
        except (BotoCoreError, ValueError) as exc:  # ValueError: a malformed endpoint URL
            raise BlobError(self._message(f"cannot set up S3 for {self.where}", exc)) from exc

    def __repr__(self) -> str:
        return f"S3BlobStore({self.where!r})"

    async def check(self) -> None:
        """Fail with a clear BlobError when the bucket is missing or the credentials are refused."""
        await asyncio.to_thread(self._check)

    async def put(self, data: bytes) -> str:
        """Store `data` unless it is there already; returns its key, the SHA-256 in hex."""
        key = digest(data)
        await asyncio.to_thread(self._put, key, data)
        return key

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`, checked against it."""
        name = self._name(key)
        data = await asyncio.to_thread(self._get, key, name)
        if digest(data) != key:
            raise BlobError(f"blob {key[:12]} is corrupt")
        return data

    def _name(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket"):
                raise BlobError(f"no bucket {self.bucket!r} for {self.where}") from exc
            raise self._translate(f"cannot use {self.where}", exc) from exc
        except NoCredentialsError as exc:
            raise BlobError(
                f"no S3 credentials for {self.where}: set ULTRALIGHT_S3_ACCESS_KEY_ID and "
                "ULTRALIGHT_S3_SECRET_ACCESS_KEY"
            ) from exc
        except BotoCoreError as exc:
            raise self._translate(f"cannot reach {self.where}", exc) from exc

    def _put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        name = self._name(key)
        try:
            if self._exists(name):
                return
            self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=data,
                ChecksumSHA256=base64.b64encode(bytes.fromhex(key)).decode(),
                ContentType="application/octet-stream",
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(f"cannot write blob {key[:12]} to {self.where}", exc) from exc

    def _exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _get(self, key: str, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            return bytes(response["Body"].read())
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey"):
                raise BlobError(f"blob {key[:12]} is missing from {self.where}") from exc
            raise self._translate(f"cannot read blob {key[:12]} from {self.where}", exc) from exc
        except BotoCoreError as exc:
            raise self._translate(f"cannot read blob {key[:12]} from {self.where}", exc) from exc

    def _translate(self, context: str, exc: Exception) -> BlobError:
        """A BlobError for a boto3 failure: refused credentials said plainly, the rest quoted."""
        from botocore.exceptions import ClientError

        code = _error_code(exc) if isinstance(exc, ClientError) else ""
        if code in _REFUSED:
            return BlobError(
                f"{context}: S3 refused access ({code}); check ULTRALIGHT_S3_ACCESS_KEY_ID, "
                "ULTRALIGHT_S3_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        return BlobError(self._message(context, exc))

    def _message(self, context: str, exc: BaseException) -> str:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if self._secret:
            reason = reason.replace(self._secret, "***")
        return f"{context}: {reason}"


def _s3_client(endpoint_url: str, region: str, access_key_id: str, secret_access_key: str) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=access_key_id or None,
        aws_secret_access_key=secret_access_key or None,
        region_name=region or None,
    )
    config = Config(
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
        # S3-compatible servers (MinIO, a test server on an IP) rarely resolve bucket subdomains.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return session.client("s3", endpoint_url=endpoint_url or None, config=config)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://BUCKET/PREFIX`` into the bucket and the prefix (possibly empty)."""
    scheme, _, rest = url.partition("://")
    if scheme != "s3" or not rest:
        shown = f"scheme {scheme[:20]!r}" if rest else "form"
        raise BlobError(
            f"unsupported blob URL {shown}: use s3://BUCKET/PREFIX, or leave ULTRALIGHT_BLOB_URL "
            "empty for a local folder"
        )
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix


def open_blob_store(settings: Settings) -> LocalBlobStore | S3BlobStore:
    """The blob store the settings name, not yet checked: the caller awaits `check()` at start."""
    if not settings.blob_url:
        return LocalBlobStore(settings.resolved_blob_dir)
    bucket, prefix = parse_s3_url(settings.blob_url)
    return S3BlobStore(
        bucket,
        prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
    )


class CodeCache:
    """Process-local cache of code by content hash: a hash never changes what it names."""

    def __init__(self, store: BlobStore, max_entries: int = 256) -> None:
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
