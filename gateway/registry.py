"""Metadata: users, API tokens, apps and their immutable versions, in SQLite or PostgreSQL.

Every lookup or change is a plain function run in one transaction on a database thread
(`Database.run`). Statements and migrations are written once, in SQLite's spelling with ``?``
placeholders; the Postgres `Dialect` renders them for that backend. The call log, grants and
secrets share this machinery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import structlog

from gateway import GatewayError
from workers.appdata import enable_wal, postgres_location

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

log = structlog.get_logger(__name__)

T = TypeVar("T")
Visibility = Literal["private", "unlisted", "public"]

MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT UNIQUE NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        prefix TEXT NOT NULL,
        hash TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE INDEX tokens_prefix ON tokens(prefix);
    CREATE TABLE apps (
        id TEXT PRIMARY KEY,
        name TEXT UNIQUE NOT NULL,
        owner_id TEXT NOT NULL REFERENCES users(id),
        visibility TEXT NOT NULL,
        live_version TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE versions (
        app_id TEXT NOT NULL REFERENCES apps(id),
        version TEXT NOT NULL,
        code_hash TEXT NOT NULL,
        description TEXT NOT NULL,
        manifest TEXT NOT NULL,
        tools TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (app_id, version)
    );
    """,
    # 2: identity, access control, limits and secrets.
    """
    ALTER TABLE users ADD COLUMN tier TEXT NOT NULL DEFAULT 'free';
    ALTER TABLE users ADD COLUMN auth_subject TEXT;
    CREATE UNIQUE INDEX users_auth_subject ON users(auth_subject);
    ALTER TABLE tokens ADD COLUMN scopes TEXT NOT NULL DEFAULT '["*"]';
    ALTER TABLE tokens ADD COLUMN apps TEXT;
    ALTER TABLE tokens ADD COLUMN functions TEXT;
    CREATE INDEX tokens_user ON tokens(user_id);
    ALTER TABLE apps ADD COLUMN limit_per_minute INTEGER;
    ALTER TABLE apps ADD COLUMN limit_per_day INTEGER;
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id),
        email TEXT NOT NULL,
        function TEXT,
        rules TEXT NOT NULL,
        created_by TEXT NOT NULL REFERENCES users(id),
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL
    );
    CREATE INDEX grants_app_email ON grants(app_id, email);
    CREATE TABLE app_env (
        app_id TEXT NOT NULL REFERENCES apps(id),
        name TEXT NOT NULL,
        key_id TEXT NOT NULL,
        sealed BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (app_id, name)
    );
    CREATE TABLE user_secrets (
        user_id TEXT NOT NULL REFERENCES users(id),
        app_id TEXT NOT NULL REFERENCES apps(id),
        name TEXT NOT NULL,
        key_id TEXT NOT NULL,
        sealed BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (user_id, app_id, name)
    );
    CREATE TABLE byok_keys (
        user_id TEXT NOT NULL REFERENCES users(id),
        provider TEXT NOT NULL,
        key_id TEXT NOT NULL,
        sealed BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (user_id, provider)
    );
    """,
]

APP_COLUMNS = "id, name, owner_id, visibility, live_version, limit_per_minute, limit_per_day"
TOKEN_COLUMNS = ("t.id, t.prefix, t.hash, u.id, u.email, u.tier, t.name, t.expires_at,"
                 " t.revoked_at, t.scopes, t.apps, t.functions, t.created_at, t.last_used_at")


class RegistryError(GatewayError):
    """A metadata lookup or change failed."""


class NotFound(RegistryError):
    """No such app, version or token."""


class Conflict(RegistryError):
    """The change clashes with what exists (a name taken by another owner)."""


class ConstraintConflict(Conflict):
    """The database refused a write that breaks one of its constraints, most often a unique key
    that another transaction took meanwhile."""


@dataclasses.dataclass(frozen=True)
class User:
    id: str
    email: str
    tier: str = "free"


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    id: str
    prefix: str
    hash: str
    user: User
    name: str
    expires_at: float | None
    revoked_at: float | None
    # ("*",) is every scope; None for apps or functions is no restriction.
    scopes: tuple[str, ...] = ("*",)
    apps: tuple[str, ...] | None = None
    functions: tuple[str, ...] | None = None
    created_at: float = 0.0
    last_used_at: float | None = None


@dataclasses.dataclass(frozen=True)
class AppRecord:
    id: str
    name: str
    owner_id: str
    visibility: Visibility
    live_version: str | None
    # Calls by others than the owner, per minute and per day; None is no limit.
    limit_per_minute: int | None = None
    limit_per_day: int | None = None


@dataclasses.dataclass(frozen=True)
class VersionRecord:
    app_id: str
    version: str
    code_hash: str
    description: str
    manifest: dict[str, Any]
    tools: list[dict[str, Any]]
    created_at: float

    def tool(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self.tools if t["name"] == name), None)


# The SQL backends.

SQLITE_BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_S = 10
PG_POOL_WAIT_S = 10
# A type name as the migrations write it (SQLite's), and what Postgres calls it. Text sorts and
# compares by bytes, as in SQLite, whatever collation the database defaults to.
PG_TYPES = {"TEXT": 'text COLLATE "C"', "INTEGER": "bigint", "REAL": "double precision",
            "BLOB": "bytea"}
_TYPE_NAME = re.compile(r"\b(?:TEXT|INTEGER|REAL|BLOB)\b")
# Postgres text cannot hold NUL; nothing stored holds one, so it stands in for one when bound.
_NUL_STAND_IN = "\ufffd"


class Cursor(Protocol):
    """What a statement returns on either backend (a sqlite3 or psycopg cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Dialect:
    """How a statement written for SQLite is spelled on a backend; SQLite's is as written."""

    name: ClassVar[str] = "sqlite"

    def statement(self, sql: str) -> str:
        return sql

    def ddl(self, sql: str) -> str:
        return sql

    def bind(self, params: Sequence[Any]) -> Sequence[Any]:
        return params


class PostgresDialect(Dialect):
    """``%s`` placeholders (and ``%%`` for a literal ``%``), Postgres type names."""

    name: ClassVar[str] = "postgres"

    def statement(self, sql: str) -> str:
        return _pg_statement(sql)

    def ddl(self, sql: str) -> str:
        return _outside_quotes(sql, lambda part: _TYPE_NAME.sub(lambda m: PG_TYPES[m[0]], part))

    def bind(self, params: Sequence[Any]) -> Sequence[Any]:
        if not any(isinstance(p, str) and "\0" in p for p in params):
            return params
        return [p.replace("\0", _NUL_STAND_IN) if isinstance(p, str) else p for p in params]


SQLITE, POSTGRES = Dialect(), PostgresDialect()


@functools.lru_cache(maxsize=1024)
def _pg_statement(sql: str) -> str:
    return _outside_quotes(sql, lambda part: part.replace("%", "%%").replace("?", "%s"))


def _outside_quotes(sql: str, change: Callable[[str], str]) -> str:
    """`sql` with `change` applied to every part outside its '…' literals."""
    parts = sql.split("'")
    return "'".join(change(part) if index % 2 == 0 else part for index, part in enumerate(parts))


class Tx:
    """One transaction, whose statements are written in SQLite's spelling on every backend."""

    __slots__ = ("_conn", "dialect")

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        # Parameters are always passed, even none: psycopg then reads %% as a literal %.
        cursor: Cursor = self._conn.execute(self.dialect.statement(sql), self.dialect.bind(params))
        return cursor

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        cursor = self._conn.cursor()
        try:
            cursor.executemany(self.dialect.statement(sql), [self.dialect.bind(r) for r in rows])
        finally:
            cursor.close()


@dataclasses.dataclass(frozen=True)
class Migrations:
    """A store's schema: numbered scripts of ``;``-separated statements, applied in order once
    each and recorded in ``table``; on Postgres under the advisory lock ``lock``."""

    component: str
    table: str
    scripts: Sequence[str]
    lock: int


@dataclasses.dataclass(frozen=True)
class Failures:
    """How a store names what fails beneath it: ``error`` for any database failure, ``conflict``
    for a broken constraint, ``what`` to open messages with, ``closed`` when used unopened."""

    error: type[GatewayError]
    conflict: type[GatewayError]
    what: str
    closed: str


class Database(ABC):
    """A SQL database a store keeps its tables in; see `open_database`."""

    dialect: ClassVar[Dialect]
    where: str  # Fit for messages and logs: never a password.

    def __init__(self, failures: Failures) -> None:
        self.failures = failures
        self._closed = False

    @abstractmethod
    async def open(self, migrations: Migrations) -> None:
        """Connect and bring the store's tables up to date."""

    @abstractmethod
    async def run(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one transaction, committed when it returns and rolled back if it
        raises; a cancelled caller does not cut it short."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; the database is not used again."""

    def _closing(self) -> bool:
        """Whether close already ran; marks it as run."""
        closed, self._closed = self._closed, True
        return closed

    def _opened(self, migrations: Migrations) -> None:
        log.debug("database_opened", component=migrations.component, backend=self.dialect.name,
                  database=self.where)


class SqliteDatabase(Database):
    """One SQLite file, on one thread holding one connection."""

    dialect = SQLITE

    def __init__(self, path: str | Path, failures: Failures) -> None:
        super().__init__(failures)
        self.path = Path(path)
        self.where = str(self.path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self, migrations: Migrations) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect, migrations)
        except (sqlite3.Error, OSError) as exc:
            raise self.failures.error(
                f"cannot open the {self.failures.what} at {self.path}: {exc}") from exc
        self._opened(migrations)

    def _connect(self, migrations: Migrations) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            enable_wal(conn)
            conn.execute("PRAGMA foreign_keys=ON")
            # IMMEDIATE takes the write lock first, so openers of a fresh file migrate in turn.
            conn.execute("BEGIN IMMEDIATE")
            try:
                _migrate(Tx(conn, SQLITE), migrations)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        conn.isolation_level = "DEFERRED"
        return conn

    async def run(self, fn: Callable[[Tx], T]) -> T:
        if self._closed:
            raise self.failures.error(self.failures.closed)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[Tx], T]) -> T:
        conn = self._conn
        if conn is None:
            raise self.failures.error(self.failures.closed)
        try:
            with conn:
                return fn(Tx(conn, SQLITE))
        except sqlite3.IntegrityError as exc:
            raise self.failures.conflict(str(exc)) from exc
        except sqlite3.Error as exc:
            raise self.failures.error(f"{self.failures.what} error: {exc}") from exc

    async def close(self) -> None:
        def shut() -> None:
            # On the thread, after the jobs queued before it.
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._closing():
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


class PostgresDatabase(Database):
    """A PostgreSQL database through a small pool of connections, each lent to one thread for
    one transaction at a time.

    No server-side prepared statements and no state kept between transactions (the migration
    lock is transaction-scoped), so a transaction-mode pooler such as pgbouncer or Supabase's may
    sit in between. psycopg is imported on first use: processes on SQLite do not load it.
    """

    dialect = POSTGRES

    def __init__(self, url: str, failures: Failures, max_connections: int = 4) -> None:
        super().__init__(failures)
        self.url = url
        self.where = postgres_location(url)
        self.max_connections = max_connections
        self._executor = ThreadPoolExecutor(max_workers=max_connections,
                                            thread_name_prefix="postgres")
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None

    async def open(self, migrations: Migrations) -> None:
        loop = asyncio.get_running_loop()
        self._pool = await loop.run_in_executor(self._executor, self._connect, migrations)
        self._opened(migrations)

    def _connect(self, migrations: Migrations) -> ConnectionPool[psycopg.Connection[Any]]:
        import psycopg
        from psycopg_pool import ConnectionPool

        options: dict[str, Any] = {"prepare_threshold": None}
        try:
            conninfo = _pg_conninfo(self.url)
            # One plain connection first: an unreachable server fails here at once, where the
            # pool would retry until its timeout.
            with psycopg.connect(conninfo, **options) as conn:
                tx = Tx(conn, POSTGRES)
                tx.execute("SELECT pg_advisory_xact_lock(?)", (migrations.lock,))
                _migrate(tx, migrations)
            pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                conninfo, min_size=1, max_size=self.max_connections, kwargs=options,
                timeout=PG_POOL_WAIT_S, name=migrations.component, open=False)
            try:
                pool.open(wait=True, timeout=PG_CONNECT_TIMEOUT_S)
            except BaseException:
                pool.close()
                raise
        except psycopg.Error as exc:
            raise self.failures.error(
                f"cannot open the {self.failures.what} at {self.where}: {self._reason(exc)}"
            ) from exc
        return pool

    async def run(self, fn: Callable[[Tx], T]) -> T:
        pool = self._pool
        if pool is None:
            raise self.failures.error(self.failures.closed)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call,
                                                                pool, fn)

    def _call(self, pool: ConnectionPool[psycopg.Connection[Any]], fn: Callable[[Tx], T]) -> T:
        import psycopg

        try:
            with pool.connection() as conn:
                return fn(Tx(conn, POSTGRES))
        except psycopg.IntegrityError as exc:
            raise self.failures.conflict(self._reason(exc)) from exc
        except psycopg.Error as exc:
            raise self.failures.error(f"{self.failures.what} error: {self._reason(exc)}") from exc

    def _reason(self, exc: BaseException) -> str:
        """The driver's message on one line, with the URL's password blanked should it quote
        the URL."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        try:
            password = urlsplit(self.url).password
        except ValueError:
            password = None
        for secret in {password, unquote(password)} if password else ():
            text = text.replace(secret, "***")
        return text

    async def close(self) -> None:
        if self._closing():
            return
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, pool.close)
        self._executor.shutdown(wait=True)


def _migrate(tx: Tx, migrations: Migrations) -> None:
    """Apply, inside the caller's transaction, the scripts the database has not had yet."""
    table = migrations.table
    tx.execute(tx.dialect.ddl(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)"))
    current = tx.execute(f"SELECT max(version) FROM {table}").fetchone()[0] or 0
    if current > len(migrations.scripts):
        log.warning("schema_newer_than_code", component=migrations.component, version=current)
    for number, script in enumerate(migrations.scripts[current:], start=current + 1):
        for statement in filter(str.strip, script.split(";")):
            tx.execute(tx.dialect.ddl(statement))
        tx.execute(f"INSERT INTO {table} (version) VALUES (?)", (number,))
        log.info("schema_migrated", component=migrations.component, version=number)


def _pg_conninfo(url: str) -> str:
    """The URL with a connect timeout unless it sets its own."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if "connect_timeout" in conninfo_to_dict(url):
        return url
    return make_conninfo(url, connect_timeout=PG_CONNECT_TIMEOUT_S)


def open_database(url: str, failures: Failures, max_connections: int = 4) -> Database:
    """The database a URL names, not yet opened: ``sqlite:///PATH``, ``postgresql://…`` or
    ``postgres://…``."""
    if url.startswith("sqlite:///") and url != "sqlite:///":
        return SqliteDatabase(url.removeprefix("sqlite:///"), failures)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, failures, max_connections)
    # Only the scheme is quoted: the rest of a URL may hold a password.
    scheme = url.split("://", 1)[0][:20] if "://" in url else ""
    problem = f"unsupported database URL scheme {scheme!r}" if scheme else "no database URL scheme"
    raise failures.error(f"{problem}: use sqlite:///PATH, postgresql://… or postgres://…")


# The registry.

FAILURES = Failures(RegistryError, ConstraintConflict, "metadata database",
                    "the registry is not open")
# Any fixed bigint, other than the other stores' ("ul_meta").
MIGRATION_LOCK = 0x756C_5F6D_6574_61
SCHEMA = Migrations("registry", "meta_schema", MIGRATIONS, MIGRATION_LOCK)


def open_registry(url: str) -> Registry:
    """The registry in the database a URL names (``ULTRALIGHT_DATABASE_URL``), not yet opened."""
    return Registry(open_database(url, FAILURES))


class Registry:
    """All metadata access, through one `Database`: a SQLite file or PostgreSQL."""

    def __init__(self, database: Database | str | Path) -> None:
        """``database``: an unopened `Database`, or the path of a SQLite file."""
        if not isinstance(database, Database):
            database = SqliteDatabase(database, FAILURES)
        self.database = database

    async def run(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a transaction on the registry's database; modules with their own tables
        (grants, secrets) go through here."""
        return await self.database.run(fn)

    _run = run

    async def _run_settled(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn``, and once more if another transaction created the same row meanwhile:
        the second time it finds that row."""
        try:
            return await self.database.run(fn)
        except ConstraintConflict:
            log.debug("registry_race_lost")
            return await self.database.run(fn)

    async def open(self) -> None:
        await self.database.open(SCHEMA)

    async def close(self) -> None:
        await self.database.close()

    # Users and tokens.

    async def ensure_user(self, email: str) -> User:
        def op(tx: Tx) -> User:
            row = tx.execute("SELECT id, email, tier FROM users WHERE email = ?",
                             (email,)).fetchone()
            if row:
                return User(*row)
            user = User(f"usr_{uuid.uuid4().hex[:16]}", email)
            tx.execute("INSERT INTO users (id, email, created_at) VALUES (?, ?, ?)",
                       (user.id, user.email, time.time()))
            return user

        return await self._run_settled(op)

    async def user_by_email(self, email: str) -> User | None:
        def op(tx: Tx) -> User | None:
            row = tx.execute("SELECT id, email, tier FROM users WHERE email = ?",
                             (email,)).fetchone()
            return User(*row) if row else None

        return await self._run(op)

    async def user_by_id(self, user_id: str) -> User | None:
        def op(tx: Tx) -> User | None:
            row = tx.execute("SELECT id, email, tier FROM users WHERE id = ?",
                             (user_id,)).fetchone()
            return User(*row) if row else None

        return await self._run(op)

    async def ensure_subject_user(self, subject: str, email: str | None) -> User:
        """The user behind an identity provider's subject, created (or linked by email) on
        first sight."""
        def op(tx: Tx) -> User:
            row = tx.execute("SELECT id, email, tier FROM users WHERE auth_subject = ?",
                             (subject,)).fetchone()
            if row:
                return User(*row)
            address = email or f"{subject}@users.invalid"
            row = tx.execute("SELECT id, email, tier, auth_subject FROM users WHERE email = ?",
                             (address,)).fetchone()
            if row and row[3] is None:
                linked = tx.execute("UPDATE users SET auth_subject = ? WHERE id = ?"
                                    " AND auth_subject IS NULL", (subject, row[0]))
                if linked.rowcount == 0:
                    raise ConstraintConflict(f"the email {address!r} was linked meanwhile")
                return User(row[0], row[1], row[2])
            # The same subject here was linked by a transaction that committed meanwhile.
            if row and row[3] != subject:
                raise Conflict(f"the email {address!r} belongs to another identity")
            if row:
                return User(row[0], row[1], row[2])
            user = User(f"usr_{uuid.uuid4().hex[:16]}", address)
            tx.execute("INSERT INTO users (id, email, created_at, auth_subject)"
                       " VALUES (?, ?, ?, ?)", (user.id, user.email, time.time(), subject))
            return user

        return await self._run_settled(op)

    async def set_tier(self, email: str, tier: str) -> User:
        def op(tx: Tx) -> User:
            updated = tx.execute("UPDATE users SET tier = ? WHERE email = ?", (tier, email))
            if updated.rowcount == 0:
                raise NotFound(f"no user with the email {email!r}")
            row = tx.execute("SELECT id, email, tier FROM users WHERE email = ?",
                             (email,)).fetchone()
            return User(*row)

        return await self._run(op)

    async def add_token(self, user: User, prefix: str, digest: str, name: str,
                        expires_at: float | None, scopes: tuple[str, ...] = ("*",),
                        apps: tuple[str, ...] | None = None,
                        functions: tuple[str, ...] | None = None) -> str:
        token_id = f"tok_{uuid.uuid4().hex[:16]}"

        def op(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO tokens (id, prefix, hash, user_id, name, created_at, expires_at,"
                " scopes, apps, functions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token_id, prefix, digest, user.id, name, time.time(), expires_at,
                 _json_list(scopes), _json_list(apps), _json_list(functions)))

        await self._run(op)
        return token_id

    async def tokens_by_prefix(self, prefix: str) -> list[TokenRecord]:
        def op(tx: Tx) -> list[TokenRecord]:
            rows = tx.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u"
                              " ON u.id = t.user_id WHERE t.prefix = ?", (prefix,))
            return [_token(r) for r in rows]

        return await self._run(op)

    async def tokens_of(self, user_id: str) -> list[TokenRecord]:
        def op(tx: Tx) -> list[TokenRecord]:
            rows = tx.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u"
                              " ON u.id = t.user_id WHERE t.user_id = ? ORDER BY t.created_at",
                              (user_id,))
            return [_token(r) for r in rows]

        return await self._run(op)

    async def revoke_token(self, user_id: str, token_id: str) -> None:
        def op(tx: Tx) -> None:
            updated = tx.execute(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?"
                " AND user_id = ?", (time.time(), token_id, user_id))
            if updated.rowcount == 0:
                raise NotFound(f"you have no token {token_id!r}")

        await self._run(op)

    async def touch_token(self, token_id: str) -> None:
        def op(tx: Tx) -> None:
            tx.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (time.time(), token_id))

        await self._run(op)

    # Apps and versions.

    async def app(self, ref: str) -> AppRecord:
        """An app by id or by name."""
        def op(tx: Tx) -> AppRecord:
            row = tx.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ? OR name = ?",
                             (ref, ref)).fetchone()
            if row is None:
                raise NotFound(f"no app named {ref!r}")
            return AppRecord(*row)

        return await self._run(op)

    async def apps_of(self, owner_id: str) -> list[AppRecord]:
        def op(tx: Tx) -> list[AppRecord]:
            rows = tx.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE owner_id = ? ORDER BY name",
                              (owner_id,))
            return [AppRecord(*r) for r in rows]

        return await self._run(op)

    async def version(self, app_id: str, version: str) -> VersionRecord:
        def op(tx: Tx) -> VersionRecord:
            row = tx.execute(
                "SELECT app_id, version, code_hash, description, manifest, tools, created_at"
                " FROM versions WHERE app_id = ? AND version = ?", (app_id, version)).fetchone()
            if row is None:
                raise NotFound(f"no version {version!r} of this app")
            return _version(row)

        return await self._run(op)

    async def versions(self, app_id: str) -> list[VersionRecord]:
        def op(tx: Tx) -> list[VersionRecord]:
            rows = tx.execute(
                "SELECT app_id, version, code_hash, description, manifest, tools, created_at"
                " FROM versions WHERE app_id = ? ORDER BY created_at", (app_id,))
            return [_version(r) for r in rows]

        return await self._run(op)

    async def save_version(self, owner: User, name: str, visibility: Visibility | None,
                           record: VersionRecord, make_live: bool) -> AppRecord:
        """Create the app on first deploy, add the version if new, and switch it live if asked."""
        def op(tx: Tx) -> AppRecord:
            row = tx.execute("SELECT id, owner_id FROM apps WHERE name = ?", (name,)).fetchone()
            if row is None:
                app_id = f"app_{uuid.uuid4().hex[:12]}"
                tx.execute(
                    "INSERT INTO apps (id, name, owner_id, visibility, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (app_id, name, owner.id, visibility or "private", time.time()))
            elif row[1] != owner.id:
                raise Conflict(f"the app name {name!r} belongs to another user")
            else:
                app_id = row[0]
                if visibility is not None:
                    tx.execute("UPDATE apps SET visibility = ? WHERE id = ?",
                               (visibility, app_id))
            tx.execute(
                "INSERT INTO versions (app_id, version, code_hash, description, manifest, tools,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (app_id, record.version, record.code_hash, record.description,
                 orjson.dumps(record.manifest).decode(), orjson.dumps(record.tools).decode(),
                 record.created_at))
            if make_live:
                tx.execute("UPDATE apps SET live_version = ? WHERE id = ?",
                           (record.version, app_id))
            found = tx.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ?",
                               (app_id,)).fetchone()
            return AppRecord(*found)

        return await self._run_settled(op)

    async def promote(self, app_id: str, version: str) -> AppRecord:
        def op(tx: Tx) -> AppRecord:
            exists = tx.execute("SELECT 1 FROM versions WHERE app_id = ? AND version = ?",
                                (app_id, version)).fetchone()
            if exists is None:
                raise NotFound(f"no version {version!r} of this app")
            tx.execute("UPDATE apps SET live_version = ? WHERE id = ?", (version, app_id))
            row = tx.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ?",
                             (app_id,)).fetchone()
            return AppRecord(*row)

        return await self._run(op)

    async def set_visibility(self, app_id: str, visibility: Visibility) -> AppRecord:
        return await self._update_app(app_id, "visibility = ?", (visibility,))

    async def set_limits(self, app_id: str, per_minute: int | None,
                         per_day: int | None) -> AppRecord:
        return await self._update_app(app_id, "limit_per_minute = ?, limit_per_day = ?",
                                      (per_minute, per_day))

    async def _update_app(self, app_id: str, assignments: str,
                          values: tuple[Any, ...]) -> AppRecord:
        def op(tx: Tx) -> AppRecord:
            tx.execute(f"UPDATE apps SET {assignments} WHERE id = ?", (*values, app_id))
            row = tx.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ?",
                             (app_id,)).fetchone()
            if row is None:
                raise NotFound("no such app")
            return AppRecord(*row)

        return await self._run(op)


def _json_list(values: tuple[str, ...] | None) -> str | None:
    return None if values is None else orjson.dumps(list(values)).decode()


def _tuple(raw: str | None) -> tuple[str, ...] | None:
    return None if raw is None else tuple(orjson.loads(raw))


def _token(row: tuple[Any, ...]) -> TokenRecord:
    return TokenRecord(row[0], row[1], row[2], User(row[3], row[4], row[5]), row[6], row[7],
                       row[8], _tuple(row[9]) or (), _tuple(row[10]), _tuple(row[11]),
                       row[12], row[13])


def _version(row: tuple[Any, ...]) -> VersionRecord:
    return VersionRecord(row[0], row[1], row[2], row[3], orjson.loads(row[4]),
                         orjson.loads(row[5]), row[6])
