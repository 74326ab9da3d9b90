"""Who is calling: API tokens and Supabase JWTs through real gateways, against a JWKS server
of the test's own on loopback. Every refusal is a 401 with WWW-Authenticate and its reason."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import http.server
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import SHARED_APPS, Farm, RedisServer, modern_call, start_farm

JWT_SECRET = "test-only-jwt-secret-of-the-local-project-0123456789"
AUDIENCE = "authenticated"
OWNER = "owner@example.test"


@dataclasses.dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        public = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}


class JwksServer:
    """Serves a JWKS on 127.0.0.1 and counts how often it is fetched."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = []
        self.hits = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                body = orjson.dumps({"keys": [k.jwk() for k in server.keys]})
                self.send_response(200 if self.path.endswith("/jwks.json") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537,
                                                             key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [rsa_key("rsa-1"), ec_key("ec-1")]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def farm(redis_server: RedisServer, jwks: JwksServer) -> Iterator[Farm]:
    """Two gateways accepting the local project's JWTs, and one worker."""
    running = start_farm(redis_server.url, gateways=2, settings={
        "ULTRALIGHT_CALL_TIMEOUT_S": "6",
        "ULTRALIGHT_SUPABASE_URL": jwks.url,
        "ULTRALIGHT_JWT_SECRET": JWT_SECRET,
        "ULTRALIGHT_JWKS_REFRESH_MIN_S": "0",
    })
    running.deploy(SHARED_APPS / "units.py", "alpha")
    running.deploy(SHARED_APPS / "units.py", "beta")
    yield running
    running.stop()


def claims(jwks: JwksServer, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "sub-owner", "email": OWNER, "aud": AUDIENCE, "iss": f"{jwks.url}/auth/v1",
            "iat": now, "exp": now + 600, "role": "authenticated"}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def signed(key: SigningKey, payload: dict[str, Any], kid: str | None = None) -> str:
    return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": kid or key.kid})


def hs256(payload: dict[str, Any], secret: bytes = JWT_SECRET.encode()) -> str:
    """An HS256 token built by hand (pyjwt refuses PEM keys as HMAC secrets, as it should)."""
    header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = b64(orjson.dumps(payload))
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def tools(farm: Farm, token: str | None, app: str = "alpha", gateway: int = 0
          ) -> httpx2.Response:
    with httpx2.Client(base_url=farm.gateways[gateway][0], timeout=30) as client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return modern_call(client, app, "tools/list", headers=headers)


def refused(response: httpx2.Response, reason: str, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["data"]["reason"] == reason, response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="ultralight"')


# Supabase JWTs.

def test_hs256_rs256_and_es256_tokens_are_accepted(farm: Farm, jwks: JwksServer) -> None:
    """A token from the project, signed any of the three allowed ways, lets its user in."""
    rsa_1, ec_1 = jwks.keys

    for token in (hs256(claims(jwks)), signed(rsa_1, claims(jwks)), signed(ec_1, claims(jwks))):
        assert tools(farm, token).status_code == 200


def test_a_new_user_is_created_on_first_sight(farm: Farm, jwks: JwksServer) -> None:
    """A subject seen for the first time becomes a user; the next token finds the same one."""
    token = signed(jwks.keys[0], claims(jwks, sub="sub-new", email="new@example.test"))

    with farm.http(token) as http:
        first = http.get("/api/me").json()
        second = http.get("/api/me").json()
    private = tools(farm, token)

    assert first["email"] == "new@example.test" and first["id"] == second["id"]
    refused(private, "no_grant", 403)


def test_the_jwks_is_not_fetched_per_request(farm: Farm, jwks: JwksServer) -> None:
    """Verification is local: known keys cost no fetch, however many requests come."""
    token = signed(jwks.keys[0], claims(jwks))
    tools(farm, token)
    hits = jwks.hits

    for _ in range(10):
        assert tools(farm, token).status_code == 200

    assert jwks.hits == hits


def test_an_unknown_kid_refreshes_the_jwks(farm: Farm, jwks: JwksServer) -> None:
    """A key published after start-up is found by refetching the JWKS on its unknown kid."""
    rotated = rsa_key("rsa-2")
    jwks.keys.append(rotated)

    assert tools(farm, signed(rotated, claims(jwks))).status_code == 200
    refused(tools(farm, signed(rotated, claims(jwks), kid="never-published")), "unknown_key")


def test_alg_none_is_refused(farm: Farm, jwks: JwksServer) -> None:
    """An unsigned token (alg none) is refused whatever it claims."""
    header = b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    token = f"{header}.{b64(orjson.dumps(claims(jwks)))}."

    refused(tools(farm, token), "unsupported_algorithm")


def test_hs256_signed_with_the_public_key_is_refused(farm: Farm, jwks: JwksServer) -> None:
    """The key-confusion attack: HS256 with the RSA public key as secret does not verify."""
    public_pem = jwks.keys[0].private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    refused(tools(farm, hs256(claims(jwks), secret=public_pem)), "bad_signature")


def test_a_key_of_the_wrong_type_is_refused(farm: Farm, jwks: JwksServer) -> None:
    """An RS256 header naming the EC key's kid does not pass."""
    header = b64(orjson.dumps({"alg": "RS256", "typ": "JWT", "kid": "ec-1"}))
    token = f"{header}.{b64(orjson.dumps(claims(jwks)))}.{b64(b'sig')}"

    refused(tools(farm, token), "unsupported_algorithm")


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"aud": "someone-else"}, "wrong_audience"),
    ({"iss": "https://other.supabase.co/auth/v1"}, "wrong_issuer"),
    ({"sub": None}, "malformed"),
    ({"aud": None}, "malformed"),
])
def test_bad_claims_are_refused(farm: Farm, jwks: JwksServer, overrides: dict[str, Any],
                                reason: str) -> None:
    """Expiry, audience and issuer are checked, and sub and aud are required."""
    refused(tools(farm, signed(jwks.keys[1], claims(jwks, **overrides))), reason)


def test_a_tampered_payload_is_refused(farm: Farm, jwks: JwksServer) -> None:
    """Changing the claims of a signed token breaks its signature."""
    header, _, signature = signed(jwks.keys[0], claims(jwks, email="x@example.test")).split(".")
    forged = f"{header}.{b64(orjson.dumps(claims(jwks)))}.{signature}"

    refused(tools(farm, forged), "bad_signature")


def test_a_wrong_secret_is_refused(farm: Farm, jwks: JwksServer) -> None:
    """An HS256 token made with another project's secret does not verify."""
    refused(tools(farm, hs256(claims(jwks), secret=b"another-projects-secret" * 2)),
            "bad_signature")


@pytest.mark.parametrize(("header", "reason"), [
    (None, "missing"),
    ("Basic b3duZXI6cHc=", "malformed"),
    ("Bearer ey.not.jwt", "malformed"),
    ("Bearer nope", "malformed"),
    ("Bearer ul_" + "A" * 32, "unknown"),
])
def test_missing_and_malformed_credentials(farm: Farm, header: str | None, reason: str) -> None:
    """No credentials, another scheme, or garbage: 401 naming the case."""
    with httpx2.Client(base_url=farm.url, timeout=30) as client:
        headers = {"Authorization": header} if header else {}
        response = modern_call(client, "alpha", "tools/list", headers=headers)

    refused(response, reason)


# API tokens.

def test_tokens_are_random_and_stored_only_as_hashes(farm: Farm) -> None:
    """A token is ul_ plus at least 128 random bits; the database keeps only its hash."""
    token = farm.new_token("hashes@example.test")

    with sqlite3.connect(farm.data_dir / "ultralight.db") as conn:
        stored = conn.execute("SELECT prefix, hash FROM tokens").fetchall()

    assert re.fullmatch(r"ul_[A-Za-z0-9_-]{32,}", token)
    assert len(base64.urlsafe_b64decode(token[3:] + "==")) * 8 >= 128
    assert all(token not in f"{prefix}{digest}" for prefix, digest in stored)
    assert (token[3:11], hashlib.sha256(token.encode()).hexdigest()) in stored


def test_a_revoked_token_stops_on_every_gateway_within_a_second(farm: Farm) -> None:
    """Revoking on one gateway reaches the other's token cache through Redis at once."""
    token = farm.new_token(OWNER)
    assert tools(farm, token, gateway=1).status_code == 200
    token_id = next(t["id"] for t in listed_tokens(farm) if t["prefix"].startswith(token[:11]))

    farm.cli("token", "revoke", token_id)
    revoked_at = time.monotonic()
    while tools(farm, token, gateway=1).status_code == 200:
        assert time.monotonic() - revoked_at < 1.0, "the second gateway still accepts it"
        time.sleep(0.02)

    refused(tools(farm, token, gateway=1), "revoked")
    refused(tools(farm, token, gateway=0), "revoked")


def test_an_expired_token_is_refused(farm: Farm) -> None:
    """A token past its expiry is refused, even while it is cached."""
    token = farm.cli("token", "create", "--email", OWNER, "--expires-days", "0.00004").stdout
    token = token.strip()
    assert tools(farm, token).status_code == 200

    deadline = time.monotonic() + 8
    while tools(farm, token).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    refused(tools(farm, token), "expired")


def test_a_token_scoped_to_another_app(farm: Farm) -> None:
    """A token limited to beta may call beta, not alpha, even though its user owns both."""
    token = farm.cli("token", "create", "--email", OWNER, "--app", "beta").stdout.strip()

    assert tools(farm, token, app="beta").status_code == 200
    refused(tools(farm, token, app="alpha"), "token_scope", 403)


def test_a_token_scoped_to_one_function(farm: Farm) -> None:
    """A token limited to echo lists only echo and may not call anything else."""
    token = farm.cli("token", "create", "--email", OWNER, "--function", "echo").stdout.strip()
    with farm.http(token) as http:
        listed = modern_call(http, "alpha", "tools/list").json()["result"]["tools"]
        other = modern_call(http, "alpha", "tools/call", {"name": "primes_below",
                                                          "arguments": {"n": 10}})
        bad_args = modern_call(http, "alpha", "tools/call", {"name": "primes_below",
                                                             "arguments": {"nope": 1}})
        echo = modern_call(http, "alpha", "tools/call", {"name": "echo",
                                                         "arguments": {"message": "hi"}})

    assert [t["name"] for t in listed] == ["echo"]
    refused(other, "token_scope", 403)
    refused(bad_args, "token_scope", 403)
    assert echo.json()["result"]["isError"] is False


def test_scopes_limit_what_a_token_may_do(farm: Farm) -> None:
    """Without the mcp scope no app may be called; without apps no app may be deployed."""
    manager = farm.cli("token", "create", "--email", OWNER, "--scope", "apps").stdout.strip()
    caller = farm.cli("token", "create", "--email", OWNER, "--scope", "mcp").stdout.strip()

    refused(tools(farm, manager), "token_scope", 403)
    assert tools(farm, caller).status_code == 200
    with farm.http(manager) as http:
        assert http.get("/api/apps").status_code == 200
    with farm.http(caller) as http:
        assert http.get("/api/apps").status_code == 403


def test_a_token_cannot_mint_a_wider_one(farm: Farm) -> None:
    """Tokens made through the API never have more scopes or apps than their maker."""
    maker = farm.cli("token", "create", "--email", OWNER, "--scope", "tokens", "--scope", "mcp",
                     "--app", "beta").stdout.strip()
    with farm.http(maker) as http:
        wider = http.post("/api/tokens", json={"scopes": ["*"], "apps": ["beta"]})
        other_app = http.post("/api/tokens", json={"scopes": ["mcp"], "apps": ["alpha"]})
        narrower = http.post("/api/tokens", json={"scopes": ["mcp"], "apps": ["beta"]})

    assert wider.status_code == 403 and other_app.status_code == 403
    assert narrower.status_code == 201
    assert tools(farm, narrower.json()["token"], app="beta").status_code == 200


def test_token_list_shows_use_but_never_values(farm: Farm) -> None:
    """token list gives ids, prefixes, scopes and last use; no token value appears."""
    token = farm.new_token(OWNER)
    tools(farm, token)

    output = farm.cli("token", "list").stdout
    entry = next(t for t in listed_tokens(farm) if t["prefix"].startswith(token[:11]))

    assert token not in output and farm.token not in output
    assert entry["last_used_at"] is not None
    assert entry["scopes"] == ["*"]


def listed_tokens(farm: Farm) -> list[dict[str, Any]]:
    return list(orjson.loads(farm.cli("token", "list", "--json").stdout))
