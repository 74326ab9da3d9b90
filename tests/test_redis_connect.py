"""Tests for workers.process.connect: Redis by URL, over TLS and through Sentinel, on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from config import Settings
from tests.backends import (
    Certificates,
    make_certificates,
    start_sentinel,
    start_tls_redis,
)
from tests.conftest import RedisServer, free_port, start_redis, stop_process
from workers import WorkerError
from workers.process import connect, redis_location, redis_settings_from, sentinel_addresses

PASSWORD = "tls-test-password-4f1c"


def settings(**values: str) -> Settings:
    """Settings from ULTRALIGHT_* style values, e.g. settings(REDIS_URL="redis://...")."""
    return Settings.from_env({f"ULTRALIGHT_{name}": value for name, value in values.items()})


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A fresh test CA and a server certificate for 127.0.0.1."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[RedisServer]:
    """A redis-server that accepts only TLS connections, with a password."""
    server = start_tls_redis(tmp_path_factory.mktemp("tls-redis"), certificates, PASSWORD)
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A plain master and one Sentinel watching it as 'ulmaster'."""
    directory = tmp_path_factory.mktemp("sentinel")
    master = start_redis(directory)
    watcher = start_sentinel(directory, master.port, "ulmaster")
    yield master, watcher
    stop_process(watcher.proc)
    stop_process(master.proc)


# --- Settings to arq's RedisSettings ---------------------------------------------------------


def test_plain_url_maps_to_redis_settings() -> None:
    """redis:// gives host, port, database and password, and no TLS."""
    mapped = redis_settings_from(settings(REDIS_URL="redis://:pw@cache.internal:6380/3"))

    assert (mapped.host, mapped.port, mapped.database) == ("cache.internal", 6380, 3)
    assert mapped.password == "pw"
    assert not mapped.ssl and not mapped.sentinel


def test_rediss_url_verifies_certificates_by_default() -> None:
    """rediss:// turns TLS on with certificate and host name checks, against the system CAs."""
    mapped = redis_settings_from(settings(REDIS_URL="rediss://cache.internal:6380/0"))

    assert mapped.ssl
    assert (mapped.ssl_cert_reqs, mapped.ssl_check_hostname) == ("required", True)
    assert mapped.ssl_ca_certs is None


def test_tls_ca_file_and_insecure_mode(certificates: Certificates) -> None:
    """A CA file is trusted as given; insecure mode turns every certificate check off."""
    ca_file = str(certificates.ca_file)
    with_ca = redis_settings_from(settings(REDIS_URL="rediss://h/0", REDIS_TLS_CA_FILE=ca_file))
    insecure = redis_settings_from(settings(REDIS_URL="rediss://h/0", REDIS_TLS_INSECURE="true"))

    assert (with_ca.ssl_ca_certs, with_ca.ssl_cert_reqs) == (ca_file, "required")
    assert (insecure.ssl_cert_reqs, insecure.ssl_check_hostname) == ("none", False)


@pytest.mark.parametrize(
    "values",
    [
        {"REDIS_URL": "redis://h/0", "REDIS_TLS_CA_FILE": "/etc/ssl/certs/ca-certificates.crt"},
        {"REDIS_URL": "redis://h/0", "REDIS_TLS_INSECURE": "1"},
        {"REDIS_URL": "rediss://h/0", "REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"},
        {"REDIS_URL": "http://h/0"},
        {"REDIS_URL": "rediss://h/0", "REDIS_SENTINELS": "h:1", "REDIS_TLS_INSECURE": "1"},
    ],
)
def test_inconsistent_redis_settings_are_refused(values: dict[str, str]) -> None:
    """Settings that cannot work (or that arq would ignore) are refused before connecting."""
    with pytest.raises(WorkerError, match="ULTRALIGHT_REDIS_"):
        redis_settings_from(settings(**values))


def test_sentinels_map_to_arq_sentinel_settings() -> None:
    """Sentinels become arq's host list; the URL still gives password, database and TLS."""
    mapped = redis_settings_from(
        settings(
            REDIS_URL="rediss://:pw@ignored:1/2",
            REDIS_SENTINELS="s1.internal:26379, [fd00::1]:26380",
            REDIS_SENTINEL_MASTER="farm",
        )
    )

    assert mapped.sentinel and mapped.sentinel_master == "farm"
    assert mapped.host == [("s1.internal", 26379), ("fd00::1", 26380)]
    assert (mapped.password, mapped.database, mapped.ssl) == ("pw", 2, True)


@pytest.mark.parametrize("raw", ["", " , ", "host", "host:", ":26379", "host:port", "h:70000"])
def test_bad_sentinel_list_is_error(raw: str) -> None:
    """Each sentinel must be host:port with a real port number."""
    with pytest.raises(WorkerError, match="ULTRALIGHT_REDIS_SENTINELS"):
        sentinel_addresses(raw)


def test_redis_location_never_shows_the_password() -> None:
    """Messages name where Redis is, never the password in the URL."""
    plain = redis_location(settings(REDIS_URL="rediss://user:s3cret@cache.internal/4"))
    via_sentinel = redis_location(
        settings(REDIS_URL="redis://:s3cret@x/0", REDIS_SENTINELS="a:1, b:2")
    )

    assert plain == "rediss://cache.internal:6379/4"
    assert via_sentinel == "master 'mymaster' via sentinels a:1,b:2"


# --- Real servers ----------------------------------------------------------------------------


async def test_tls_with_the_test_ca(tls_redis: RedisServer, certificates: Certificates) -> None:
    """rediss:// with the CA file connects, checks the host name, and the pool works."""
    pool = await connect(
        settings(REDIS_URL=tls_redis.url, REDIS_TLS_CA_FILE=str(certificates.ca_file))
    )
    try:
        await pool.set("ul:test:tls", b"over tls")
        assert await pool.get("ul:test:tls") == b"over tls"
    finally:
        await pool.aclose()


async def test_tls_insecure_skips_verification(tls_redis: RedisServer) -> None:
    """Insecure mode connects to a server whose CA is not trusted."""
    pool = await connect(settings(REDIS_URL=tls_redis.url, REDIS_TLS_INSECURE="true"))
    try:
        assert await pool.ping()
    finally:
        await pool.aclose()


async def test_tls_with_an_untrusted_certificate_fails_clearly(tls_redis: RedisServer) -> None:
    """Without the CA the certificate is refused: a WorkerError, with no password in it."""
    with pytest.raises(WorkerError) as caught:
        await connect(settings(REDIS_URL=tls_redis.url))

    message = str(caught.value)
    assert message.startswith(f"cannot reach Redis at rediss://127.0.0.1:{tls_redis.port}/0: ")
    assert "certificate verify failed" in message
    assert PASSWORD not in message


async def test_sentinel_finds_the_master(sentinel: tuple[RedisServer, RedisServer]) -> None:
    """Through Sentinel (a dead sentinel listed first) the pool writes to the real master."""
    master, watcher = sentinel
    dead = f"127.0.0.1:{free_port()}"
    pool = await connect(
        settings(
            REDIS_URL="redis://unused/0",
            REDIS_SENTINELS=f"{dead},127.0.0.1:{watcher.port}",
            REDIS_SENTINEL_MASTER="ulmaster",
        )
    )
    try:
        await pool.set("ul:test:sentinel", b"via sentinel")
    finally:
        await pool.aclose()

    direct = redis.Redis.from_url(master.url)
    try:
        assert direct.get("ul:test:sentinel") == b"via sentinel"
    finally:
        direct.close()
