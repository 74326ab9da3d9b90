"""Tests for workers.blobs: content-addressed code bundles in a local folder and in S3 (moto)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from config import Settings
from tests import backends
from tests.backends import S3Server, start_s3_server
from tests.conftest import free_port, stop_process
from workers import WorkerError
from workers.blobs import (
    BlobError,
    CodeCache,
    LocalBlobStore,
    S3BlobStore,
    open_blob_store,
    parse_s3_url,
)

# Fixtures from tests.backends.
aws_env = backends.aws_env
s3_server = backends.s3_server

SECRET = "wJalrXUtnFEMI-very-secret-test-key"
BlobStore = LocalBlobStore | S3BlobStore
MakeBlobStore = Callable[..., Awaitable[BlobStore]]


def s3_client(server: S3Server) -> Any:
    """A plain boto3 client on the test server, to look behind the store's back."""
    return boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1")


def new_bucket(server: S3Server) -> str:
    """A fresh, empty bucket on the test server."""
    name = f"blobs-{uuid.uuid4().hex[:12]}"
    s3_client(server).create_bucket(Bucket=name)
    return name


def s3_store(server: S3Server, bucket: str, prefix: str = "code/v1", **options: str) -> S3BlobStore:
    """An S3 store on the test server with test credentials."""
    settings = {
        "endpoint_url": server.endpoint_url,
        "region": "us-east-1",
        "access_key_id": "testing-key-id",
        "secret_access_key": SECRET,
        **options,
    }
    return S3BlobStore(bucket, prefix, **settings)


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, aws_env: None) -> BlobStore:
    """A checked, empty blob store of each kind."""
    if request.param == "local":
        blobs: BlobStore = LocalBlobStore(tmp_path / "blobs")
    else:
        server = request.getfixturevalue("s3_server")
        blobs = s3_store(server, new_bucket(server))
    await blobs.check()
    return blobs


# --- Both kinds ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"print('hi')\n", bytes(range(256)) * 4000])
async def test_put_returns_sha256_and_get_returns_the_bytes(store: BlobStore, data: bytes) -> None:
    """A blob's key is the SHA-256 of its bytes in hex, and get gives the same bytes back."""
    key = await store.put(data)

    assert key == hashlib.sha256(data).hexdigest()
    assert await store.get(key) == data


async def test_put_twice_is_harmless(store: BlobStore) -> None:
    """Putting the same bytes again gives the same key and changes nothing."""
    first = await store.put(b"same")
    second = await store.put(b"same")

    assert first == second
    assert await store.get(first) == b"same"


async def test_missing_blob_is_error(store: BlobStore) -> None:
    """A key never put is a BlobError saying it is missing."""
    with pytest.raises(BlobError, match="is missing"):
        await store.get(hashlib.sha256(b"never stored").hexdigest())


@pytest.mark.parametrize("key", ["", "abc", "../" + "0" * 61, "A" * 64, "g" * 64, None])
async def test_bad_key_is_error(store: BlobStore, key: Any) -> None:
    """Only 64 lowercase hex digits name a blob."""
    with pytest.raises(BlobError, match="not a blob key"):
        await store.get(key)


async def test_code_cache_reads_through_the_store(store: BlobStore) -> None:
    """The code cache decodes a blob once and keeps it."""
    key = await store.put("print('é')".encode())
    cache = CodeCache(store)

    assert await cache.source(key) == "print('é')"
    assert await cache.source(key) == "print('é')"


def test_blob_errors_are_worker_errors() -> None:
    """BlobError shares the worker package's root exception."""
    assert issubclass(BlobError, WorkerError)


# --- Local folder ----------------------------------------------------------------------------


async def test_local_corrupt_blob_is_error(tmp_path: Path) -> None:
    """A file whose bytes no longer match its name is reported as corrupt."""
    blobs = LocalBlobStore(tmp_path)
    key = await blobs.put(b"good")
    (tmp_path / key[:2] / key).write_bytes(b"evil")

    with pytest.raises(BlobError, match="corrupt"):
        await blobs.get(key)


async def test_local_check_refuses_an_unusable_folder(tmp_path: Path) -> None:
    """check() names a blob folder that cannot be created."""
    (tmp_path / "file").write_text("not a folder")

    with pytest.raises(BlobError, match="cannot use the blob folder"):
        await LocalBlobStore(tmp_path / "file" / "blobs").check()


# --- S3 --------------------------------------------------------------------------------------


async def test_s3_objects_sit_under_the_prefix(s3_server: S3Server, aws_env: None) -> None:
    """Each blob is one object named PREFIX/SHA256 in the bucket, with its checksum."""
    bucket = new_bucket(s3_server)
    key = await s3_store(s3_server, bucket, "/code/v1/").put(b"bundle")

    listing = s3_client(s3_server).list_objects_v2(Bucket=bucket)

    assert [item["Key"] for item in listing["Contents"]] == [f"code/v1/{key}"]


async def test_s3_never_overwrites_and_checks_reads(s3_server: S3Server, aws_env: None) -> None:
    """An existing object is left alone by put, and bytes that do not match their key fail get."""
    bucket = new_bucket(s3_server)
    blobs = s3_store(s3_server, bucket, "")
    key = await blobs.put(b"original")
    s3_client(s3_server).put_object(Bucket=bucket, Key=key, Body=b"tampered")

    await blobs.put(b"original")

    with pytest.raises(BlobError, match="corrupt"):
        await blobs.get(key)


async def test_s3_missing_bucket_is_a_clear_error(s3_server: S3Server, aws_env: None) -> None:
    """check() on a bucket that does not exist says so, naming it."""
    blobs = s3_store(s3_server, "no-such-bucket-here")

    with pytest.raises(
        BlobError, match=r"no bucket 'no-such-bucket-here' for s3://no-such-bucket-here/code/v1/ at"
    ):
        await blobs.check()


async def test_s3_refused_credentials_are_a_clear_error(
    aws_env: None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that rejects the keys gives a BlobError naming the settings, never the secret."""
    caplog.set_level(logging.DEBUG)
    server = start_s3_server(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        blobs = s3_store(server, "some-bucket")
        with pytest.raises(BlobError) as checked:
            await blobs.check()
        with pytest.raises(BlobError) as written:
            await blobs.put(b"code")
    finally:
        stop_process(server.proc)

    for caught in (checked, written):
        assert "S3 refused access" in str(caught.value)
        assert "ULTRALIGHT_S3_SECRET_ACCESS_KEY" in str(caught.value)
    output = capsys.readouterr()
    for text in (str(checked.value), str(written.value), caplog.text, output.out, output.err):
        assert SECRET not in text


async def test_s3_unreachable_endpoint_is_a_clear_error(
    aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listening at the endpoint gives a BlobError naming it, without the secret."""
    caplog.set_level(logging.DEBUG)
    endpoint = f"http://127.0.0.1:{free_port()}"
    blobs = S3BlobStore(
        "bucket", endpoint_url=endpoint, access_key_id="id", secret_access_key=SECRET
    )

    with pytest.raises(BlobError, match=f"cannot reach s3://bucket/ at {endpoint}") as caught:
        await blobs.check()

    assert SECRET not in str(caught.value) and SECRET not in caplog.text
    assert SECRET not in repr(blobs)


def test_s3_needs_both_keys_or_neither() -> None:
    """One key without the other is a configuration error, caught at construction."""
    with pytest.raises(BlobError, match="set both"):
        S3BlobStore("bucket", access_key_id="id")
    with pytest.raises(BlobError, match="set both"):
        S3BlobStore("bucket", secret_access_key=SECRET)


# --- Choosing a store ------------------------------------------------------------------------


def test_open_blob_store_defaults_to_the_local_folder(tmp_path: Path) -> None:
    """An empty blob_url means the folder under data_dir (or blob_dir)."""
    default = open_blob_store(Settings.from_env({}, data_dir=tmp_path))
    chosen = open_blob_store(Settings.from_env({"ULTRALIGHT_BLOB_DIR": str(tmp_path / "b")}))

    assert isinstance(default, LocalBlobStore) and default.root == tmp_path / "blobs"
    assert isinstance(chosen, LocalBlobStore) and chosen.root == tmp_path / "b"


def test_open_blob_store_reads_s3_settings(aws_env: None) -> None:
    """blob_url s3://BUCKET/PREFIX and the s3_* settings make an S3 store."""
    env = {
        "ULTRALIGHT_BLOB_URL": "s3://code-bundles/prod/blobs",
        "ULTRALIGHT_S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "ULTRALIGHT_S3_REGION": "auto",
        "ULTRALIGHT_S3_ACCESS_KEY_ID": "id",
        "ULTRALIGHT_S3_SECRET_ACCESS_KEY": SECRET,
    }
    settings = Settings.from_env(env)

    blobs = open_blob_store(settings)

    assert isinstance(blobs, S3BlobStore)
    assert (blobs.bucket, blobs.prefix) == ("code-bundles", "prod/blobs/")
    assert blobs.where == "s3://code-bundles/prod/blobs/ at http://127.0.0.1:9"
    assert SECRET not in repr(settings) and SECRET not in repr(blobs)


@pytest.mark.parametrize(
    ("url", "expected"),
    [("s3://b", ("b", "")), ("s3://b/", ("b", "")), ("s3://b/p/q", ("b", "p/q"))],
)
def test_parse_s3_url(url: str, expected: tuple[str, str]) -> None:
    """The bucket is the first segment; the rest is the prefix."""
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", ["gs://bucket/x", "bucket/x", "s3://", "file:///srv/blobs"])
def test_unsupported_blob_url_is_error(url: str) -> None:
    """Anything but s3://BUCKET/PREFIX is refused, saying what to use instead."""
    with pytest.raises(BlobError, match="use s3://BUCKET/PREFIX"):
        open_blob_store(Settings.from_env({"ULTRALIGHT_BLOB_URL": url}))
