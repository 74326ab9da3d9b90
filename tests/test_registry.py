"""Tests for gateway.registry and the call log's store: the metadata on SQLite and PostgreSQL.

Every test that takes a store runs on both backends, which must give the same answers; the last
test starts a gateway and a worker on PostgreSQL alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from config import Settings
from gateway.calllog import CallLogError, CallLogStore, CallRecord, open_call_log
from gateway.grants import GrantStore, Rules
from gateway.registry import (
    Conflict,
    NotFound,
    PostgresDatabase,
    Registry,
    RegistryError,
    User,
    VersionRecord,
    open_registry,
)
from gateway.secrets import SecretKeys, Secrets, rotate
from tests import backends
from tests.backends import PostgresServer, UrlFor, run_sql
from tests.conftest import SHARED_APPS, RedisServer, free_port, start_farm, wait_until

# Fixtures from tests.backends.
backend = backends.backend
postgres_server = backends.postgres_server
postgres_if_needed = backends.postgres_if_needed
database_url = backends.database_url

postgres_only = pytest.mark.parametrize("backend", ["postgres"])
# An exact double with more digits than Postgres's 4-byte REAL keeps.
PRECISE = 1_234_567_890.123456
MakeRegistry = Callable[[], Awaitable[Registry]]


@pytest.fixture
async def make_registry(database_url: UrlFor) -> AsyncIterator[MakeRegistry]:
    """Open registries through open_registry, all on this test's one database."""
    opened: list[Registry] = []

    async def make() -> Registry:
        registry = open_registry(await database_url("meta.db"))
        await registry.open()
        opened.append(registry)
        return registry

    yield make

    for registry in opened:
        await registry.close()


@pytest.fixture
async def registry(make_registry: MakeRegistry) -> Registry:
    """One open registry."""
    return await make_registry()


@pytest.fixture
async def call_log(database_url: UrlFor) -> AsyncIterator[CallLogStore]:
    """The call log's store, in the same database as the registry."""
    store = open_call_log(await database_url("meta.db"))
    await store.open()
    yield store
    await store.close()


def version(number: int, created_at: float = PRECISE) -> VersionRecord:
    return VersionRecord("", f"v{number}", f"code{number}", f"version {number}",
                         {"n": number}, [{"name": "echo", "inputSchema": {}}], created_at)


def call(request_id: str, at: float, **fields: Any) -> CallRecord:
    defaults: dict[str, Any] = {
        "app_id": "app_1", "app_name": "notes", "version": "v1", "code_hash": "c",
        "function": "add", "user_id": "usr_1", "source": "mcp", "session_id": None, "seq": None,
        "outcome": "ok", "error": None, "duration_ms": 2.25, "worker_id": "w1"}
    return CallRecord.build(args={"x": 1}, value={"ok": True}, ok=True,
                            request_id=request_id, at=at, **{**defaults, **fields})


# --- Users and tokens ---------------------------------------------------------------------------


async def test_a_user_is_created_once_and_found_by_email_and_id(registry: Registry) -> None:
    """ensure_user makes a user the first time and returns the same one after."""
    first = await registry.ensure_user("ann@example.test")

    again = await registry.ensure_user("ann@example.test")
    by_email = await registry.user_by_email("ann@example.test")
    by_id = await registry.user_by_id(first.id)

    assert first == again == by_email == by_id == User(first.id, "ann@example.test", "free")
    assert await registry.user_by_email("nobody@example.test") is None
    assert await registry.user_by_id("usr_missing") is None


async def test_tier_changes_and_unknown_users(registry: Registry) -> None:
    """set_tier puts a user on a tier; an unknown email is NotFound."""
    await registry.ensure_user("ann@example.test")

    user = await registry.set_tier("ann@example.test", "pro")

    assert user.tier == "pro"
    with pytest.raises(NotFound, match="no user with the email"):
        await registry.set_tier("nobody@example.test", "pro")


async def test_subject_users_link_by_email_once(registry: Registry) -> None:
    """A subject links to the account with its email; another subject may not take it."""
    existing = await registry.ensure_user("ann@example.test")

    linked = await registry.ensure_subject_user("sub-1", "ann@example.test")
    again = await registry.ensure_subject_user("sub-1", None)
    anonymous = await registry.ensure_subject_user("sub-2", None)

    assert linked == again == existing
    assert anonymous.email == "sub-2@users.invalid"
    with pytest.raises(Conflict, match="belongs to another identity"):
        await registry.ensure_subject_user("sub-3", "ann@example.test")


async def test_tokens_are_found_by_prefix_with_their_user(registry: Registry) -> None:
    """A token comes back by its prefix with its user, scopes, restrictions and exact times."""
    ann = await registry.ensure_user("ann@example.test")
    bob = await registry.ensure_user("bob@example.test")
    first = await registry.add_token(ann, "ul_aaaa", "hash-1", "cli", PRECISE, ("mcp",),
                                     ("notes",), ("add",))
    await registry.add_token(bob, "ul_aaaa", "hash-2", "other", None)
    second = await registry.add_token(ann, "ul_bbbb", "hash-3", "ci", None)

    found = await registry.tokens_by_prefix("ul_aaaa")
    mine = await registry.tokens_of(ann.id)

    assert {(t.hash, t.user) for t in found} == {("hash-1", ann), ("hash-2", bob)}
    token = next(t for t in found if t.id == first)
    assert (token.prefix, token.name, token.expires_at) == ("ul_aaaa", "cli", PRECISE)
    assert (token.scopes, token.apps, token.functions) == (("mcp",), ("notes",), ("add",))
    assert token.revoked_at is None and token.last_used_at is None
    assert [t.id for t in mine] == [first, second]
    assert await registry.tokens_by_prefix("ul_cccc") == []


async def test_tokens_are_revoked_once_and_touched(registry: Registry) -> None:
    """Revoking keeps the first time; only the owner may revoke; a touch stamps last use."""
    ann = await registry.ensure_user("ann@example.test")
    bob = await registry.ensure_user("bob@example.test")
    token_id = await registry.add_token(ann, "ul_aaaa", "hash", "cli", None)

    await registry.revoke_token(ann.id, token_id)
    (revoked,) = await registry.tokens_by_prefix("ul_aaaa")
    await registry.revoke_token(ann.id, token_id)
    await registry.touch_token(token_id)
    (touched,) = await registry.tokens_by_prefix("ul_aaaa")

    assert revoked.revoked_at is not None and touched.revoked_at == revoked.revoked_at
    assert touched.last_used_at is not None
    with pytest.raises(NotFound, match="you have no token"):
        await registry.revoke_token(bob.id, token_id)


# --- Apps and versions --------------------------------------------------------------------------


async def test_deploys_make_apps_and_versions_and_promote_switches(registry: Registry) -> None:
    """The first deploy makes a private app; a draft stays off; promote switches; a version
    saved twice is kept once."""
    ann = await registry.ensure_user("ann@example.test")

    created = await registry.save_version(ann, "notes", None, version(1), make_live=True)
    draft = await registry.save_version(ann, "notes", None, version(2, PRECISE + 1), False)
    await registry.save_version(ann, "notes", None, version(2, PRECISE + 1), False)
    promoted = await registry.promote(created.id, "v2")

    assert (created.name, created.visibility, created.live_version) == ("notes", "private", "v1")
    assert draft.live_version == "v1" and promoted.live_version == "v2"
    assert [v.version for v in await registry.versions(created.id)] == ["v1", "v2"]
    stored = await registry.version(created.id, "v1")
    assert stored == VersionRecord(created.id, "v1", "code1", "version 1", {"n": 1},
                                   [{"name": "echo", "inputSchema": {}}], PRECISE)
    assert await registry.app("notes") == await registry.app(created.id) == promoted
    with pytest.raises(NotFound):
        await registry.promote(created.id, "v9")
    with pytest.raises(NotFound):
        await registry.version(created.id, "v9")


async def test_app_names_belong_to_their_owner(registry: Registry) -> None:
    """Another user cannot deploy over a name; unknown apps, even odd names, are NotFound."""
    ann = await registry.ensure_user("ann@example.test")
    bob = await registry.ensure_user("bob@example.test")
    await registry.save_version(ann, "notes", "public", version(1), True)

    with pytest.raises(Conflict, match="belongs to another user"):
        await registry.save_version(bob, "notes", None, version(2), True)
    for ref in ("missing", "nul\x00name"):
        with pytest.raises(NotFound, match="no app named"):
            await registry.app(ref)


async def test_apps_list_in_byte_order_with_settings(registry: Registry) -> None:
    """An owner's apps come sorted by name byte for byte (capitals first) on both backends;
    visibility and limits change in place."""
    ann = await registry.ensure_user("ann@example.test")
    for name in ("beta", "Zeta", "alpha"):
        app = await registry.save_version(ann, name, None, version(1), True)

    public = await registry.set_visibility(app.id, "public")
    limited = await registry.set_limits(app.id, 10, None)

    assert [a.name for a in await registry.apps_of(ann.id)] == ["Zeta", "alpha", "beta"]
    assert public.visibility == "public"
    assert (limited.limit_per_minute, limited.limit_per_day) == (10, None)
    with pytest.raises(NotFound):
        await registry.set_visibility("app_missing", "public")


# --- Grants and secrets, through the registry's database ----------------------------------------


async def test_a_grant_is_stored_found_and_revoked(registry: Registry) -> None:
    """A grant comes back for its caller (any case of email) until revoked."""
    ann = await registry.ensure_user("ann@example.test")
    app = await registry.save_version(ann, "notes", None, version(1), True)
    grants = GrantStore(registry)

    grant = await grants.add(app.id, "Bob@Example.test", "add", Rules(ips=("10.0.0.0/8",)),
                             PRECISE, ann.id)
    found = await grants.for_caller(app.id, "bob@example.test")
    revoked = await grants.revoke(app.id, grant.id)

    assert found == [grant]
    assert revoked.revoked_at is not None
    assert await grants.for_caller(app.id, "bob@example.test") == []
    assert [g.id for g in await grants.of_app(app.id, include_revoked=True)] == [grant.id]
    with pytest.raises(NotFound):
        await grants.revoke(app.id, "gr_missing")


async def test_env_vars_are_sealed_listed_and_removed(registry: Registry, tmp_path: Path) -> None:
    """Env vars round-trip through encryption at rest, list in byte order, and unset once."""
    ann = await registry.ensure_user("ann@example.test")
    app = await registry.save_version(ann, "notes", None, version(1), True)
    secrets = Secrets(registry, SecretKeys(Settings(data_dir=tmp_path)), None, 10.0)

    await secrets.set_env(app.id, "b_key", "one")
    await secrets.set_env(app.id, "API_URL", "https://example.test")
    await secrets.set_env(app.id, "b_key", "two")

    assert [n["name"] for n in await secrets.env_names(app.id)] == ["API_URL", "b_key"]
    assert await secrets.env_values(app.id) == {"API_URL": "https://example.test", "b_key": "two"}
    assert await secrets.unset_env(app.id, "b_key") is True
    assert await secrets.unset_env(app.id, "b_key") is False


async def test_secrets_rotate_to_a_new_key(registry: Registry, tmp_path: Path) -> None:
    """Rotation rewrites each sealed record under the new key, and every value still opens."""
    ann = await registry.ensure_user("ann@example.test")
    app = await registry.save_version(ann, "notes", None, version(1), True)
    keys = SecretKeys(Settings(data_dir=tmp_path))
    secrets = Secrets(registry, keys, None, 10.0)
    await secrets.set_env(app.id, "API_URL", "https://example.test")
    await secrets.set_byok(ann.id, "openai", "sk-test-value")

    new_key = keys.add_local_key()
    report = await rotate(registry, keys)
    again = await rotate(registry, keys)

    assert (report.key_id, report.rewritten, report.total) == (new_key, 2, 2)
    assert again.rewritten == 0
    assert await Secrets(registry, keys, None, 10.0).byok_values(ann.id) == {
        "openai": "sk-test-value"}


# --- The call log -------------------------------------------------------------------------------


async def test_call_log_stores_each_call_once_and_queries_newest_first(
    call_log: CallLogStore,
) -> None:
    """Entries land once however often they are drained, and come back filtered, newest first,
    with their flags and exact times."""
    records = [call("r1", PRECISE), call("r2", PRECISE + 1, function="find"),
               call("r3", PRECISE + 2, outcome="error", error="boom"),
               call("r4", PRECISE + 3, replay_of="r1")]

    await call_log.insert_many(records)
    await call_log.insert_many(records[:2])

    assert await call_log.query("app_1") == records[2::-1]
    assert [r.request_id for r in await call_log.query("app_1", include_replays=True)] == [
        "r4", "r3", "r2", "r1"]
    assert await call_log.query("app_1", function="find") == [records[1]]
    assert await call_log.query("app_1", outcome="error") == [records[2]]
    assert await call_log.query("app_1", since=PRECISE + 1, until=PRECISE + 2) == [records[1]]
    assert await call_log.query("app_1", limit=1) == [records[2]]
    assert await call_log.query("app_2") == []
    assert records[0].args_truncated is False and records[0].result_digest


async def test_call_log_reads_by_id_and_prunes_old_entries(call_log: CallLogStore) -> None:
    """by_ids finds only the app's own entries; prune drops those before a time."""
    wanted = call("r1", PRECISE)
    await call_log.insert_many([call("r0", PRECISE - 10), wanted, call("x1", PRECISE, app_id="b")])

    found = await call_log.by_ids("app_1", ["r1", "x1", "missing"])
    pruned = await call_log.prune(PRECISE)

    assert found == [wanted]
    assert pruned == 1
    assert [r.request_id for r in await call_log.query("app_1")] == ["r1"]


async def test_call_log_keeps_truncation_flags_and_odd_text(call_log: CallLogStore) -> None:
    """A capped argument keeps its flag; an error message holding NUL is stored, not refused."""
    record = CallRecord.build(
        args={"text": "x" * 20_000}, value=None, ok=False, request_id="r1", at=PRECISE,
        app_id="app_1", app_name="notes", version="v1", code_hash="c", function="add",
        user_id=None, source=None, session_id="s1", seq=3, outcome="error",
        error="bad\x00byte", duration_ms=1.0, worker_id=None)

    await call_log.insert_many([record])
    (stored,) = await call_log.query("app_1")

    assert stored.args_truncated is True and stored.result_truncated is False
    assert (stored.session_id, stored.seq, stored.result) == ("s1", 3, None)
    assert stored.error is not None and stored.error.startswith("bad")


# --- Opening, migrating and failing -------------------------------------------------------------


async def test_concurrent_opens_migrate_once(database_url: UrlFor) -> None:
    """Registries and call logs opening one fresh database at once all succeed on one schema."""
    url = await database_url("race.db")
    stores: list[Registry | CallLogStore] = [open_registry(url) for _ in range(3)]
    stores += [open_call_log(url) for _ in range(2)]

    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        for store in stores:
            await store.close()

    assert run_sql(url, "SELECT version FROM meta_schema ORDER BY version") == [(1,), (2,)]
    assert run_sql(url, "SELECT version FROM call_log_schema ORDER BY version") == [(1,), (2,)]


async def test_concurrent_first_sight_makes_one_user(make_registry: MakeRegistry) -> None:
    """Gateways meeting a new user at the same moment agree on one account."""
    first, second = await make_registry(), await make_registry()

    users = await asyncio.gather(*(r.ensure_user("new@example.test")
                                   for _ in range(4) for r in (first, second)))
    subjects = await asyncio.gather(*(r.ensure_subject_user("sub-9", "sub@example.test")
                                      for _ in range(4) for r in (first, second)))

    assert len(set(users)) == 1 and len(set(subjects)) == 1


async def test_reopening_keeps_the_data_and_schema(make_registry: MakeRegistry,
                                                   database_url: UrlFor) -> None:
    """A second open migrates nothing and sees what the first wrote."""
    first = await make_registry()
    ann = await first.ensure_user("ann@example.test")
    await first.close()

    second = await make_registry()

    assert await second.user_by_id(ann.id) == ann
    url = await database_url("meta.db")
    assert run_sql(url, "SELECT version FROM meta_schema ORDER BY version") == [(1,), (2,)]


async def test_closed_stores_say_so(make_registry: MakeRegistry, call_log: CallLogStore) -> None:
    """Calls on a closed registry or call log fail with their own error."""
    registry = await make_registry()
    await registry.close()
    await call_log.close()

    with pytest.raises(RegistryError, match="the registry is not open"):
        await registry.app("notes")
    with pytest.raises(CallLogError, match="the call log is not open"):
        await call_log.query("app_1")


@pytest.mark.parametrize("url", ["mysql://user:hunter2@db/meta", "sqlite:///", "meta.db"])
def test_unsupported_database_urls_name_the_schemes(url: str) -> None:
    """A URL neither backend takes is refused with the schemes that work, and no password."""
    with pytest.raises(RegistryError, match=r"use sqlite:///PATH, postgresql://") as caught:
        open_registry(url)
    with pytest.raises(CallLogError, match=r"use sqlite:///PATH, postgresql://"):
        open_call_log(url)

    assert "hunter2" not in str(caught.value)


async def test_unreachable_postgres_is_one_clear_line() -> None:
    """Nothing listening gives a RegistryError naming host and port, not the password, fast."""
    port = free_port()
    registry = open_registry(f"postgresql://meta:hunter2secret@127.0.0.1:{port}/meta")
    started = time.monotonic()

    with pytest.raises(RegistryError) as caught:
        await registry.open()
    await registry.close()

    message = str(caught.value)
    assert message.startswith(
        f"cannot open the metadata database at postgresql://127.0.0.1:{port}/meta: ")
    assert "hunter2secret" not in message and "\n" not in message
    assert time.monotonic() - started < 5


@postgres_only
async def test_no_server_side_prepared_statements(registry: Registry) -> None:
    """Statements run again and again stay unprepared, as a transaction-mode pooler needs."""
    ann = await registry.ensure_user("ann@example.test")
    for _ in range(12):
        await registry.user_by_id(ann.id)
        await registry.tokens_of(ann.id)

    # One call at a time keeps the pool at one connection, so this is the same session.
    prepared = await registry.run(
        lambda tx: tx.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0])

    assert isinstance(registry.database, PostgresDatabase)
    assert prepared == 0


@postgres_only
async def test_postgres_columns_keep_sqlite_semantics(registry: Registry,
                                                      database_url: UrlFor) -> None:
    """Times are double precision, flags and counts 64-bit, text compared byte for byte."""
    url = await database_url("meta.db")

    types = dict(run_sql(url, "SELECT column_name || '.' || table_name, data_type FROM"
                              " information_schema.columns WHERE table_schema = current_schema()"
                              " AND table_name IN ('tokens', 'app_env')"))
    collations = run_sql(url, "SELECT DISTINCT collation_name FROM information_schema.columns"
                              " WHERE table_schema = current_schema() AND data_type = 'text'")

    assert types["expires_at.tokens"] == "double precision"
    assert types["sealed.app_env"] == "bytea"
    assert collations == [("C",)]


# --- A gateway on PostgreSQL --------------------------------------------------------------------


@pytest.fixture
def postgres_farm_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh schema for a farm, in a URL holding a password the server does not ask for."""
    schema = f"farm_{free_port()}"
    run_sql(postgres_server.url, f'CREATE SCHEMA "{schema}"')
    yield (f"postgresql://postgres:pg-farm-password@127.0.0.1:{postgres_server.port}/postgres"
           f"?options={quote(f'-c search_path={schema}')}")
    run_sql(postgres_server.url, f'DROP SCHEMA "{schema}" CASCADE')


def test_a_gateway_on_postgres_deploys_and_calls(redis_server: RedisServer,
                                                 postgres_farm_url: str) -> None:
    """With a postgresql:// database URL, a gateway and a worker keep metadata, the call log and
    app data in Postgres, and nothing in SQLite."""
    url = postgres_farm_url
    farm = start_farm(redis_server.url, settings={"ULTRALIGHT_DATABASE_URL": url,
                                                  "ULTRALIGHT_CALL_TIMEOUT_S": "10"})
    try:
        farm.deploy(SHARED_APPS / "notes.py", "notes")
        added = farm.cli("call", "notes", "add_note", "--args", '{"text": "on postgres"}')
        found = farm.cli("call", "notes", "find_notes")
        wait_until(lambda: run_sql(url, "SELECT count(*) FROM call_log") == [(2,)], 10,
                   "the call log did not reach Postgres")
        logs = farm.logs()
    finally:
        farm.stop()

    assert '"key": "notes/' in added.stdout and "on postgres" in found.stdout
    assert run_sql(url, "SELECT name, visibility FROM apps") == [("notes", "private")]
    assert run_sql(url, "SELECT count(*) FROM app_data") == [(1,)]
    assert not (farm.data_dir / "ultralight.db").exists()
    assert "pg-farm-password" not in logs
