"""What a tool call carries to the farm: the app's env vars, the caller's secrets and BYOK keys,
sealed with the farm key and bound to the call."""

from __future__ import annotations

import asyncio

from gateway import GatewayError
from gateway.registry import AppRecord, User, VersionRecord
from gateway.secrets import Declared, declared
from gateway.state import Gateway
from workers.sealing import SealedPayload, job_aad, seal


class MissingSecrets(GatewayError):
    """The app declares required env vars or per-user secrets that are not set; the message
    lists them (names only) and how to set them."""


async def seal_call(gateway: Gateway, app: AppRecord, version: VersionRecord, user: User | None,
                    call_id: str, caller_secrets: bool = True,
                    reveal: list[str] | None = None) -> str | None:
    """The sealed payload for one call, or None when there is nothing to seal.

    ``caller_secrets=False`` (replays) seals the app's env vars only: the caller's own secrets
    and provider keys stay out, and an app that requires them raises MissingSecrets.
    """
    specs = declared(version.manifest)
    per_user = {name for name, spec in specs.items() if spec.per_user}
    secrets = gateway.secrets
    mine: dict[str, str] = {}
    byok: dict[str, str] = {}
    if user is None or not caller_secrets:
        env = await secrets.env_values(app.id)
    else:
        env, mine, byok = await asyncio.gather(
            secrets.env_values(app.id),
            secrets.user_secret_values(user.id, app.id) if per_user else _nothing(),
            secrets.byok_values(user.id))
    env = {name: value for name, value in env.items() if name not in per_user}
    mine = {name: value for name, value in mine.items() if name in per_user}
    check_required(app, specs, env, mine, user if caller_secrets else None)
    payload = SealedPayload(env=env, secrets=mine, byok=byok)
    if reveal is not None:
        # The caller's own record of the call masks these values (the call log, for one).
        reveal.extend([*env.values(), *mine.values(), *byok.values()])
    if payload.empty:
        return None
    return seal(gateway.farm_keys, payload, job_aad(call_id, app.id, user.id if user else None))


async def _nothing() -> dict[str, str]:
    return {}


def check_required(app: AppRecord, specs: dict[str, Declared], env: dict[str, str],
                   mine: dict[str, str], user: User | None) -> None:
    missing_app = [s for s in specs.values() if s.required and not s.per_user
                   and s.name not in env]
    missing_mine = [s for s in specs.values() if s.required and s.per_user
                    and s.name not in mine]
    if missing_app:
        names = ", ".join(s.name for s in missing_app)
        raise MissingSecrets(f"the app {app.name!r} is not configured yet: its owner must set "
                             f"{names} (ultralight env set {app.name} NAME)")
    if not missing_mine:
        return
    listed = "; ".join(f"{s.name}" + (f" ({s.description})" if s.description else "")
                       for s in missing_mine)
    if user is None:
        raise MissingSecrets(f"the app {app.name!r} needs per-user secrets ({listed}): call it "
                             f"with your own token and set them first")
    commands = "; ".join(f"ultralight secret set {app.name} {s.name}" for s in missing_mine)
    several = len(missing_mine) > 1
    raise MissingSecrets(f"the app {app.name!r} needs your own secret{'s' if several else ''} "
                         f"{listed}, which you have not set. Set {'them' if several else 'it'} "
                         f"with: {commands}")
