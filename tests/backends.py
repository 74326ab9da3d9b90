"""Real production backends for tests, all on loopback: a throwaway PostgreSQL cluster, a moto S3
server, a redis-server speaking TLS with certificates made here, and a Redis Sentinel.

Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import ipaddress
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from tests.conftest import RedisServer, free_port, port_open, stop_process, wait_until

BACKENDS = ("sqlite", "postgres")
PG_USER_FALLBACK = "ultralight-pg"
# Settings that only a throwaway cluster may use: durability off for speed.
PG_SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
)


# --- PostgreSQL ------------------------------------------------------------------------------


@dataclasses.dataclass
class PostgresServer:
    """A PostgreSQL cluster in a temp folder, listening on a loopback port."""

    port: int
    directory: Path
    run_as: dict[str, Any]
    pg_ctl: str

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def schema_url(self, schema: str) -> str:
        """A URL whose connections work in `schema` (it must exist)."""
        return f"{self.url}?options={quote(f'-c search_path={schema}')}"

    def stop(self) -> None:
        data = str(self.directory / "data")
        with contextlib.suppress(subprocess.SubprocessError):
            _run_as([self.pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], self.run_as, 30)
        shutil.rmtree(self.directory, ignore_errors=True)


def _postgres_binaries() -> tuple[str, str]:
    for folder in ["", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb = shutil.which("initdb", path=folder or None)
        pg_ctl = shutil.which("pg_ctl", path=folder or None)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    pytest.fail("PostgreSQL's initdb and pg_ctl are not installed (Debian: postgresql)")


def _unprivileged() -> dict[str, Any]:
    """Popen arguments that drop root, which PostgreSQL refuses to run as; {} when not root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            PG_USER_FALLBACK,
        ],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(PG_USER_FALLBACK)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _run_as(command: list[str], run_as: dict[str, Any], timeout: float) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd="/", **run_as
    )
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed: {result.stdout}{result.stderr}")


def start_postgres() -> PostgresServer:
    """initdb and start a cluster in a new temp folder, owned by an unprivileged user if root."""
    initdb, pg_ctl = _postgres_binaries()
    run_as = _unprivileged()
    # Not pytest's tmp_path: its folders are private to root, out of reach of the server's user.
    directory = Path(tempfile.mkdtemp(prefix="ultralight-pg-"))
    if run_as:
        os.chown(directory, run_as["user"], run_as["group"])
    data, port = directory / "data", free_port()
    base = [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
    try:
        # An ICU default collation orders text unlike byte order, as hosted Postgres does, so
        # a query that forgets COLLATE "C" fails here; plain C.UTF-8 where ICU is missing.
        try:
            icu = ["--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"]
            _run_as([*base, *icu], run_as, 120)
        except RuntimeError:
            shutil.rmtree(data, ignore_errors=True)
            _run_as([*base, "--locale=C.UTF-8"], run_as, 120)
        log = str(directory / "server.log")
        options = f"-p {port} {PG_SERVER_OPTIONS}"
        _run_as([pg_ctl, "-D", str(data), "-l", log, "-o", options, "-w", "start"], run_as, 60)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return PostgresServer(port, directory, run_as, pg_ctl)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session, stopped and deleted at its end."""
    server = start_postgres()
    yield server
    server.stop()


async def create_schema(server: PostgresServer, schema: str) -> str:
    """Create `schema` and return a URL whose connections use it."""
    async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    return server.schema_url(schema)


# --- One database URL per test, on either backend --------------------------------------------

UrlFor = Callable[[str], Awaitable[str]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The app-data backend under test; a test may pin one by parametrizing `backend` itself."""
    return str(request.param)


@pytest.fixture
def postgres_if_needed(backend: str, request: pytest.FixtureRequest) -> PostgresServer | None:
    """The session's cluster when the backend is Postgres; SQLite runs never start one."""
    return request.getfixturevalue("postgres_server") if backend == "postgres" else None


@pytest.fixture
async def database_url(
    postgres_if_needed: PostgresServer | None, tmp_path: Path
) -> AsyncIterator[UrlFor]:
    """url_for(name): a database URL for this test; the same name gives the same database.

    SQLite: a file named `name` under tmp_path. Postgres: a fresh schema in the session's cluster.
    """
    server = postgres_if_needed
    prefix = f"t{uuid.uuid4().hex[:10]}"
    urls: dict[str, str] = {}

    async def url_for(name: str) -> str:
        if name not in urls:
            if server is None:
                urls[name] = f"sqlite:///{tmp_path / name}"
            else:
                schema = prefix + "_" + re.sub(r"\W", "_", name)
                urls[name] = await create_schema(server, schema)
        return urls[name]

    yield url_for


def run_sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run one statement straight on a test database, behind the store's back."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


# --- S3 (moto) -------------------------------------------------------------------------------


@dataclasses.dataclass
class S3Server:
    """A moto server in S3 mode on a loopback port."""

    endpoint_url: str
    proc: subprocess.Popen[bytes]


# Dummy credentials, and no way to reach a metadata address or a developer's AWS config.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_AWS_VARIABLES_TO_DROP = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN")


def start_s3_server(**extra_env: str) -> S3Server:
    """moto_server as a child process (its own warnings and threads stay out of the tests)."""
    port = free_port()
    env = {**os.environ, **S3_TEST_ENV, **extra_env}
    for name in _AWS_VARIABLES_TO_DROP:
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), 30, "moto_server did not listen")
    except TimeoutError:
        stop_process(proc)
        raise
    return S3Server(f"http://127.0.0.1:{port}", proc)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials in this process, and no metadata lookups."""
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    for name in _AWS_VARIABLES_TO_DROP:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session, accepting any credentials."""
    server = start_s3_server()
    yield server
    stop_process(server.proc)


# --- TLS certificates ------------------------------------------------------------------------


@dataclasses.dataclass
class Certificates:
    """A test CA and a server certificate it signed, for 127.0.0.1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(directory: Path) -> Certificates:
    """Write a fresh CA and a server key and certificate into `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ultralight test CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])

    def certificate(subject: x509.Name, key: Any, is_ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        if not is_ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    files = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pem = serialization.Encoding.PEM
    files.ca_file.write_bytes(certificate(ca_name, ca_key, True).public_bytes(pem))
    files.cert_file.write_bytes(certificate(server_name, server_key, False).public_bytes(pem))
    files.key_file.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


# --- Redis over TLS, and Sentinel ------------------------------------------------------------


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run scripts/test.sh, which installs it")
    return binary


def start_tls_redis(directory: Path, certificates: Certificates, password: str) -> RedisServer:
    """A redis-server that speaks only TLS, with a password, on a loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [
            _redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certificates.cert_file),
            "--tls-key-file", str(certificates.key_file),
            "--tls-ca-cert-file", str(certificates.ca_file),
            "--tls-auth-clients", "no", "--requirepass", password,
            "--save", "", "--appendonly", "no", "--dir", str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_for_port(proc, port, "redis-server (TLS)")
    return RedisServer(f"rediss://:{password}@127.0.0.1:{port}/0", port, proc)


def start_sentinel(directory: Path, master_port: int, master_name: str) -> RedisServer:
    """A redis-server in Sentinel mode watching the master on `master_port`."""
    port = free_port()
    config = directory / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n"
    )
    proc = subprocess.Popen([_redis_server(), str(config), "--sentinel"], stdout=subprocess.DEVNULL)
    _wait_for_port(proc, port, "redis-server --sentinel")
    return RedisServer(f"redis://127.0.0.1:{port}", port, proc)


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 10, f"{what} did not listen")
    except TimeoutError:
        stop_process(proc)
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"{what} exited with code {proc.returncode}")
