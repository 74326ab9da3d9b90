"""Who may call what: grants on private apps and each of their rules at its boundary, through
real gateways (two of them, to see a revoke cross over), plus the rules' logic directly."""

from __future__ import annotations

import datetime
import ipaddress
import math
import time
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import httpx2
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.gates import client_address
from gateway.grants import (
    Grant,
    GrantError,
    Rules,
    check_call,
    check_context,
    parse_days,
    parse_expiry,
    parse_window,
    resolve_function,
)
from tests.conftest import SHARED_APPS, Farm, RedisServer, modern_call, start_farm

APP = "priv"
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture(scope="module")
def farm(redis_server: RedisServer) -> Iterator[Farm]:
    """Two gateways behind a trusted loopback proxy (so X-Forwarded-For names the caller)."""
    running = start_farm(redis_server.url, gateways=2, settings={
        "ULTRALIGHT_CALL_TIMEOUT_S": "6",
        "ULTRALIGHT_TRUSTED_PROXIES": "127.0.0.1/32",
    })
    running.deploy(SHARED_APPS / "units.py", APP)
    yield running
    running.stop()


def grant(farm: Farm, email: str, **rules: Any) -> httpx2.Response:
    with farm.http(farm.token) as http:
        return http.post(f"/api/apps/{APP}/grants", json={"email": email, **rules})


def granted(farm: Farm, email: str, **rules: Any) -> tuple[str, dict[str, Any]]:
    """A fresh user's token and the grant given to them."""
    response = grant(farm, email, **rules)
    assert response.status_code == 201, response.text
    return farm.new_token(email), dict(response.json())


def call(farm: Farm, token: str | None, tool: str = "echo", arguments: Any = None,
         address: str | None = None, gateway: int = 0) -> httpx2.Response:
    headers = {"X-Forwarded-For": address} if address else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    args = {"message": "hi"} if arguments is None and tool == "echo" else arguments or {}
    with httpx2.Client(base_url=farm.gateways[gateway][0], timeout=30) as client:
        return modern_call(client, APP, "tools/call", {"name": tool, "arguments": args}, headers)


def listing(farm: Farm, token: str, gateway: int = 0) -> httpx2.Response:
    with httpx2.Client(base_url=farm.gateways[gateway][0], timeout=30) as client:
        return modern_call(client, APP, "tools/list",
                           headers={"Authorization": f"Bearer {token}"})


def allowed(response: httpx2.Response) -> bool:
    assert response.status_code in (200, 403, 429), response.text
    return response.status_code == 200 and not response.json()["result"].get("isError")


def reason(response: httpx2.Response) -> str:
    return str(response.json()["error"]["data"]["reason"])


# Who may call.

def test_without_a_grant_others_are_forbidden(farm: Farm) -> None:
    """A private app answers 403 no_grant to a signed-in stranger and 401 to nobody."""
    stranger = farm.new_token("stranger@example.test")

    refused = call(farm, stranger)

    assert refused.status_code == 403 and reason(refused) == "no_grant"
    assert "grant" in refused.json()["error"]["message"]
    assert call(farm, None).status_code == 401


def test_a_grant_lets_its_user_call(farm: Farm) -> None:
    """A plain grant allows every tool of the app."""
    token, _ = granted(farm, "plain@example.test")

    assert allowed(call(farm, token))
    assert len(listing(farm, token).json()["result"]["tools"]) == 4


def test_a_grant_waits_for_its_account(farm: Farm) -> None:
    """A grant to an email with no account yet applies once that account exists."""
    assert grant(farm, "Later@Example.test").status_code == 201

    token = farm.new_token("later@example.test")

    assert allowed(call(farm, token))


def test_function_grants_match_tool_names(farm: Farm) -> None:
    """A grant given with a client's prefixed name holds the bare tool name, and allows only it."""
    token, given = granted(farm, "one-tool@example.test", function=f"mcp__{APP}__echo")

    other = call(farm, token, "primes_below", {"n": 5})

    assert given["function"] == "echo"
    assert allowed(call(farm, token))
    assert other.status_code == 403 and reason(other) == "function_not_granted"
    assert [t["name"] for t in listing(farm, token).json()["result"]["tools"]] == ["echo"]


def test_cidr_edges(farm: Farm) -> None:
    """Both ends of a range are inside it; one address beyond either end is not."""
    token, _ = granted(farm, "cidr@example.test", ips=["203.0.113.0/24", "2001:db8::/126"])

    inside = ["203.0.113.0", "203.0.113.255", "2001:db8::", "2001:db8::3",
              "::ffff:203.0.113.7"]
    outside = ["203.0.112.255", "203.0.114.0", "2001:db8::4", "127.0.0.1"]

    assert all(allowed(call(farm, token, address=a)) for a in inside)
    for address in outside:
        refused = call(farm, token, address=address)
        assert refused.status_code == 403 and reason(refused) == "ip_not_allowed", address


def test_windows_in_and_out_of_now(farm: Farm) -> None:
    """A window around the present (in Berlin) allows; one two hours away refuses, with why."""
    hour = datetime.datetime.now(BERLIN).hour
    around = f"{(hour - 1) % 24:02d}-{(hour + 2) % 24:02d}"
    away = f"{(hour + 2) % 24:02d}-{(hour + 4) % 24:02d}"
    inside, _ = granted(farm, "window-in@example.test", hours=around, tz="Europe/Berlin")
    outside, _ = granted(farm, "window-out@example.test", hours=away, tz="Europe/Berlin")

    refused = call(farm, outside)

    assert allowed(call(farm, inside))
    assert refused.status_code == 403 and reason(refused) == "outside_window"
    assert "Europe/Berlin" in refused.json()["error"]["message"]


def test_the_last_call_of_a_budget(farm: Farm) -> None:
    """A budget of 3 a day allows exactly 3 calls, then 429 until midnight UTC."""
    token, _ = granted(farm, "budget@example.test", budget="3/day")

    results = [allowed(call(farm, token)) for _ in range(3)]
    listing(farm, token)  # listing the tools uses no budget
    over = call(farm, token)

    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).date()
    midnight = datetime.datetime.combine(tomorrow, datetime.time(), datetime.UTC).timestamp()
    assert results == [True, True, True]
    assert over.status_code == 429 and reason(over) == "budget_exhausted"
    assert abs(int(over.headers["Retry-After"]) - math.ceil(midnight - time.time())) <= 2


def test_an_expired_grant_allows_nothing(farm: Farm) -> None:
    """A grant past its expiry is refused with grant_expired."""
    token, _ = granted(farm, "expired@example.test", expires="2001-01-01T00:00:00Z")

    refused = call(farm, token)

    assert refused.status_code == 403 and reason(refused) == "grant_expired"


def test_allowed_argument_values(farm: Farm) -> None:
    """Only listed values pass; an omitted argument counts as its default."""
    token, _ = granted(farm, "args@example.test", allow_args={"times": ["1", "2"]})

    default = call(farm, token, "echo", {"message": "a"})
    two = call(farm, token, "echo", {"message": "a", "times": 2})
    three = call(farm, token, "echo", {"message": "a", "times": 3})

    assert allowed(default) and allowed(two)
    assert three.status_code == 403 and reason(three) == "argument_not_allowed"
    assert "3" not in three.json()["error"]["message"].split("one of")[0]


def test_a_revoke_reaches_the_other_gateway_within_a_second(farm: Farm) -> None:
    """Revoking on gateway 0 stops the grantee on gateway 1 (which cached the grant) at once."""
    token, given = granted(farm, "revoked@example.test")
    assert listing(farm, token, gateway=1).status_code == 200

    with farm.http(farm.token) as http:
        assert http.delete(f"/api/apps/{APP}/grants/{given['id']}").status_code == 200
    revoked_at = time.monotonic()
    while listing(farm, token, gateway=1).status_code == 200:
        assert time.monotonic() - revoked_at < 1.0, "gateway 1 still honours the grant"
        time.sleep(0.02)

    assert reason(listing(farm, token, gateway=1)) == "no_grant"


def test_grant_commands(farm: Farm) -> None:
    """ultralight grant, grants and revoke-grant, with every rule given on the command line."""
    grant_id = farm.cli("grant", APP, "cli@example.test", "--function", "echo", "--ip",
                        "127.0.0.1", "--ip", "10.0.0.0/8", "--hours", "22-06", "--days",
                        "mon-fri", "--tz", "Europe/Berlin", "--budget", "100/day", "--expires",
                        "30d", "--allow-arg", "times=1,2").stdout.strip()

    listed = farm.cli("grants", APP).stdout
    farm.cli("revoke-grant", APP, grant_id)
    after = farm.cli("grants", APP).stdout

    line = next(row for row in listed.splitlines() if row.startswith(grant_id))
    assert "cli@example.test" in line and "echo" in line and "budget=100/day" in line
    assert "hours=22:00-06:00 days=mon,tue,wed,thu,fri tz=Europe/Berlin" in line
    assert grant_id not in after


def test_visibility_opens_and_closes_an_app(farm: Farm) -> None:
    """Unlisted and public apps need no grant; making one private again shuts others out."""
    stranger = farm.new_token("visitor@example.test")

    farm.cli("visibility", APP, "unlisted")
    opened = call(farm, stranger)
    farm.cli("visibility", APP, "private")
    closed = call(farm, stranger)

    assert allowed(opened)
    assert closed.status_code == 403


@pytest.mark.parametrize(("rules", "message"), [
    ({"ips": ["10.0.0.300/8"]}, "not an IP address or CIDR range"),
    ({"hours": "25-03"}, "not a time of day"),
    ({"hours": "09-09"}, "must not start and end at the same time"),
    ({"hours": "22-06", "tz": "Mars/Olympus"}, "not a known time zone"),
    ({"days": "mon-funday"}, "is not a day"),
    ({"budget": "3/fortnight"}, "budget must look like"),
    ({"function": "no_such_tool"}, "has no tool 'no_such_tool'"),
    ({"expires": "next tuesday"}, "is not a date"),
    ({"allow_args": {"times": []}}, "must be a list of 1 to"),
])
def test_bad_grants_are_explained(farm: Farm, rules: dict[str, Any], message: str) -> None:
    """A grant that cannot be understood is refused with what to fix."""
    response = grant(farm, "bad@example.test", **rules)

    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


# The rules, directly, at their boundaries.

def at(text: str) -> float:
    """An instant given as Berlin wall-clock time."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def test_a_window_over_midnight_in_berlin() -> None:
    """22-06 on weekdays, Europe/Berlin: the early hours belong to the night that began them."""
    window = parse_window("22-06", "mon-fri", "Europe/Berlin")
    assert window is not None
    # 2025-01-03 is a Friday, 2025-01-06 a Monday.
    cases = {
        "2025-01-03T21:59:59": False,  # Friday, a second before the window opens
        "2025-01-03T22:00:00": True,   # Friday night opens
        "2025-01-04T05:59:59": True,   # Saturday early hours: still Friday's window
        "2025-01-04T06:00:00": False,  # closed
        "2025-01-04T22:00:00": False,  # Saturday night is not a weekday's window
        "2025-01-06T05:00:00": False,  # Monday early hours belong to Sunday's night
        "2025-01-06T23:30:00": True,   # Monday night
        "2025-01-07T05:59:00": True,   # ... continuing into Tuesday
    }

    for moment, expected in cases.items():
        assert window.allows(at(moment)) is expected, moment


def test_a_window_keeps_wall_clock_time_across_dst() -> None:
    """Berlin's 09-17 stays 09-17 local time in winter (UTC+1) and summer (UTC+2)."""
    window = parse_window("09-17", None, "Europe/Berlin")
    assert window is not None

    assert window.allows(at("2025-01-15T09:00:00")) and window.allows(at("2025-07-15T09:00:00"))
    assert not window.allows(at("2025-07-15T08:59:59"))
    assert not window.allows(at("2025-01-15T17:00:00"))


def test_days_parse_ranges_that_wrap() -> None:
    """fri-mon wraps the week; lists and single days combine."""
    assert parse_days("fri-mon") == {4, 5, 6, 0}
    assert parse_days("mon,wed-thu, sun") == {0, 2, 3, 6}


def test_cidr_boundaries_directly() -> None:
    """The first and last address of a range match; the neighbours do not."""
    grant_ = Grant("g", "a", "e", None, Rules(ips=("192.0.2.64/26",)), 0.0, None)
    addresses = {"192.0.2.64": True, "192.0.2.127": True, "192.0.2.63": False,
                 "192.0.2.128": False}

    for text, expected in addresses.items():
        refusal = check_context(grant_, ipaddress.ip_address(text), 0.0)
        assert (refusal is None) is expected, text
    assert check_context(grant_, None, 0.0) is not None


def test_expiry_is_exclusive() -> None:
    """A grant is good until the instant it expires, not at it."""
    grant_ = Grant("g", "a", "e", None, Rules(), 0.0, expires_at=1000.0)

    assert check_context(grant_, None, 999.999) is None
    assert check_context(grant_, None, 1000.0) == ("grant_expired",
                                                   "your grant to this app has expired")


def test_argument_values_compare_as_json() -> None:
    """true is not 1; text from the command line matches the number it spells."""
    grant_ = Grant("g", "a", "e", None, Rules(allow_args={"n": (1, "2")}), 0.0, None)
    schema = {"properties": {"n": {"type": "integer"}}}

    assert check_call(grant_, "f", {"n": 1}, schema) is None
    assert check_call(grant_, "f", {"n": 2}, schema) is None
    assert check_call(grant_, "f", {"n": True}, schema) is not None
    assert check_call(grant_, "f", {}, schema) is not None


def test_prefixed_function_names_resolve() -> None:
    """Names as clients show them resolve to the app's tool; others are refused."""
    tools = ["find_notes", "add_note"]

    for name in ("find_notes", "mcp__notes__find_notes", "notes.find_notes", "notes__find_notes"):
        assert resolve_function(name, "notes", tools) == "find_notes"
    with pytest.raises(GrantError):
        resolve_function("other__find_notes", "notes", tools)


def test_relative_and_absolute_expiry() -> None:
    """30d is thirty days from now; a date without a zone is UTC."""
    assert parse_expiry("30d", 100.0) == 100.0 + 30 * 86400
    assert parse_expiry("2030-01-01", 0.0) == datetime.datetime(
        2030, 1, 1, tzinfo=datetime.UTC).timestamp()


def test_forwarded_addresses_only_from_trusted_proxies() -> None:
    """X-Forwarded-For counts only when the peer is a trusted proxy; trusted hops are skipped."""
    trusted = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    header = {"X-Forwarded-For": "198.51.100.7, 10.1.2.3"}

    request = make_mocked_request("POST", "/", headers=header).clone(remote="127.0.0.1")
    stranger = make_mocked_request("POST", "/", headers=header).clone(remote="192.0.2.1")

    assert str(client_address(request, trusted)) == "198.51.100.7"
    assert str(client_address(request, ())) == "127.0.0.1"
    assert str(client_address(stranger, trusted)) == "192.0.2.1"
