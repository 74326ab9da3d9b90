"""Metadata: users, API tokens, apps and their immutable versions, in SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from gateway import GatewayError

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


class Registry:
    """All metadata access, on one thread with one SQLite connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        self._conn: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a transaction on the registry's thread; modules with their own tables
        (grants, secrets) go through here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    _run = run

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise RegistryError("the registry is not open")
        try:
            with self._conn:
                return fn(self._conn)
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc
        except sqlite3.Error as exc:
            raise RegistryError(f"metadata database error: {exc}") from exc

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.isolation_level = "DEFERRED"
        self._conn = conn
        with conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM meta_schema").fetchone()
            current = row[0] or 0
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO meta_schema (version) VALUES (?)", (number,))

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)

    # Users and tokens.

    async def ensure_user(self, email: str) -> User:
        def op(conn: sqlite3.Connection) -> User:
            row = conn.execute("SELECT id, email, tier FROM users WHERE email = ?",
                               (email,)).fetchone()
            if row:
                return User(*row)
            user = User(f"usr_{uuid.uuid4().hex[:16]}", email)
            conn.execute("INSERT INTO users (id, email, created_at) VALUES (?, ?, ?)",
                         (user.id, user.email, time.time()))
            return user

        return await self._run(op)

    async def user_by_email(self, email: str) -> User | None:
        def op(conn: sqlite3.Connection) -> User | None:
            row = conn.execute("SELECT id, email, tier FROM users WHERE email = ?",
                               (email,)).fetchone()
            return User(*row) if row else None

        return await self._run(op)

    async def user_by_id(self, user_id: str) -> User | None:
        def op(conn: sqlite3.Connection) -> User | None:
            row = conn.execute("SELECT id, email, tier FROM users WHERE id = ?",
                               (user_id,)).fetchone()
            return User(*row) if row else None

        return await self._run(op)

    async def ensure_subject_user(self, subject: str, email: str | None) -> User:
        """The user behind an identity provider's subject, created (or linked by email) on
        first sight."""
        def op(conn: sqlite3.Connection) -> User:
            row = conn.execute("SELECT id, email, tier FROM users WHERE auth_subject = ?",
                               (subject,)).fetchone()
            if row:
                return User(*row)
            address = email or f"{subject}@users.invalid"
            row = conn.execute("SELECT id, email, tier, auth_subject FROM users WHERE email = ?",
                               (address,)).fetchone()
            if row and row[3] is None:
                conn.execute("UPDATE users SET auth_subject = ? WHERE id = ?", (subject, row[0]))
                return User(row[0], row[1], row[2])
            if row:
                raise Conflict(f"the email {address!r} belongs to another identity")
            user = User(f"usr_{uuid.uuid4().hex[:16]}", address)
            conn.execute("INSERT INTO users (id, email, created_at, auth_subject)"
                         " VALUES (?, ?, ?, ?)", (user.id, user.email, time.time(), subject))
            return user

        return await self._run(op)

    async def set_tier(self, email: str, tier: str) -> User:
        def op(conn: sqlite3.Connection) -> User:
            updated = conn.execute("UPDATE users SET tier = ? WHERE email = ?", (tier, email))
            if updated.rowcount == 0:
                raise NotFound(f"no user with the email {email!r}")
            row = conn.execute("SELECT id, email, tier FROM users WHERE email = ?",
                               (email,)).fetchone()
            return User(*row)

        return await self._run(op)

    async def add_token(self, user: User, prefix: str, digest: str, name: str,
                        expires_at: float | None, scopes: tuple[str, ...] = ("*",),
                        apps: tuple[str, ...] | None = None,
                        functions: tuple[str, ...] | None = None) -> str:
        token_id = f"tok_{uuid.uuid4().hex[:16]}"
        await self._run(lambda conn: conn.execute(
            "INSERT INTO tokens (id, prefix, hash, user_id, name, created_at, expires_at,"
            " scopes, apps, functions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (token_id, prefix, digest, user.id, name, time.time(), expires_at,
             _json_list(scopes), _json_list(apps), _json_list(functions))))
        return token_id

    async def tokens_by_prefix(self, prefix: str) -> list[TokenRecord]:
        def op(conn: sqlite3.Connection) -> list[TokenRecord]:
            rows = conn.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u"
                                " ON u.id = t.user_id WHERE t.prefix = ?", (prefix,))
            return [_token(r) for r in rows]

        return await self._run(op)

    async def tokens_of(self, user_id: str) -> list[TokenRecord]:
        def op(conn: sqlite3.Connection) -> list[TokenRecord]:
            rows = conn.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens t JOIN users u"
                                " ON u.id = t.user_id WHERE t.user_id = ? ORDER BY t.created_at",
                                (user_id,))
            return [_token(r) for r in rows]

        return await self._run(op)

    async def revoke_token(self, user_id: str, token_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?"
                " AND user_id = ?", (time.time(), token_id, user_id))
            if updated.rowcount == 0:
                raise NotFound(f"you have no token {token_id!r}")

        await self._run(op)

    async def touch_token(self, token_id: str) -> None:
        await self._run(lambda conn: conn.execute(
            "UPDATE tokens SET last_used_at = ? WHERE id = ?", (time.time(), token_id)))

    # Apps and versions.

    async def app(self, ref: str) -> AppRecord:
        """An app by id or by name."""
        def op(conn: sqlite3.Connection) -> AppRecord:
            row = conn.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ? OR name = ?",
                               (ref, ref)).fetchone()
            if row is None:
                raise NotFound(f"no app named {ref!r}")
            return AppRecord(*row)

        return await self._run(op)

    async def apps_of(self, owner_id: str) -> list[AppRecord]:
        def op(conn: sqlite3.Connection) -> list[AppRecord]:
            rows = conn.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE owner_id = ? ORDER BY name",
                                (owner_id,))
            return [AppRecord(*r) for r in rows]

        return await self._run(op)

    async def version(self, app_id: str, version: str) -> VersionRecord:
        def op(conn: sqlite3.Connection) -> VersionRecord:
            row = conn.execute(
                "SELECT app_id, version, code_hash, description, manifest, tools, created_at"
                " FROM versions WHERE app_id = ? AND version = ?", (app_id, version)).fetchone()
            if row is None:
                raise NotFound(f"no version {version!r} of this app")
            return _version(row)

        return await self._run(op)

    async def versions(self, app_id: str) -> list[VersionRecord]:
        def op(conn: sqlite3.Connection) -> list[VersionRecord]:
            rows = conn.execute(
                "SELECT app_id, version, code_hash, description, manifest, tools, created_at"
                " FROM versions WHERE app_id = ? ORDER BY created_at", (app_id,))
            return [_version(r) for r in rows]

        return await self._run(op)

    async def save_version(self, owner: User, name: str, visibility: Visibility | None,
                           record: VersionRecord, make_live: bool) -> AppRecord:
        """Create the app on first deploy, add the version if new, and switch it live if asked."""
        def op(conn: sqlite3.Connection) -> AppRecord:
            row = conn.execute("SELECT id, owner_id FROM apps WHERE name = ?", (name,)).fetchone()
            if row is None:
                app_id = f"app_{uuid.uuid4().hex[:12]}"
                conn.execute(
                    "INSERT INTO apps (id, name, owner_id, visibility, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (app_id, name, owner.id, visibility or "private", time.time()))
            elif row[1] != owner.id:
                raise Conflict(f"the app name {name!r} belongs to another user")
            else:
                app_id = row[0]
                if visibility is not None:
                    conn.execute("UPDATE apps SET visibility = ? WHERE id = ?",
                                 (visibility, app_id))
            conn.execute(
                "INSERT OR IGNORE INTO versions (app_id, version, code_hash, description,"
                " manifest, tools, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (app_id, record.version, record.code_hash, record.description,
                 orjson.dumps(record.manifest).decode(), orjson.dumps(record.tools).decode(),
                 record.created_at))
            if make_live:
                conn.execute("UPDATE apps SET live_version = ? WHERE id = ?",
                             (record.version, app_id))
            found = conn.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ?",
                                 (app_id,)).fetchone()
            return AppRecord(*found)

        return await self._run(op)

    async def promote(self, app_id: str, version: str) -> AppRecord:
        def op(conn: sqlite3.Connection) -> AppRecord:
            exists = conn.execute("SELECT 1 FROM versions WHERE app_id = ? AND version = ?",
                                  (app_id, version)).fetchone()
            if exists is None:
                raise NotFound(f"no version {version!r} of this app")
            conn.execute("UPDATE apps SET live_version = ? WHERE id = ?", (version, app_id))
            row = conn.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ?",
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
        def op(conn: sqlite3.Connection) -> AppRecord:
            conn.execute(f"UPDATE apps SET {assignments} WHERE id = ?", (*values, app_id))
            row = conn.execute(f"SELECT {APP_COLUMNS} FROM apps WHERE id = ?",
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
