"""People and services, attacked with third-party clients.

PyJWT forges access tokens (alg none, wrong key, RS256 header, expired,
tampered, missing exp); a stolen refresh token is replayed; a password is
guessed until the lockout; Authlib's OAuth 2.0 client gets tokens with the
client credentials grant; and an OpenID Connect login runs end to end
against the local provider in oidc_provider.py. After every attack the
server must still be healthy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import ADMIN_EMAIL, FerriteServer, ferrite_binary
from oidc_provider import Login, OidcProvider

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    instance = OidcProvider().start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, provider: OidcProvider) -> Iterator[FerriteServer]:
    """A server whose [auth.oidc] points at the local provider."""
    base = tmp_path_factory.mktemp("identity")
    instance = FerriteServer(ferrite_binary(), data_dir=base / "data", log_path=base / "ferrite.log")
    secret_file = base / "oidc-client-secret"
    secret_file.write_text(provider.client_secret + "\n")
    config = base / "ferrite.toml"
    config.write_text(
        "[auth.oidc]\n"
        f'issuer = "{provider.issuer}"\n'
        f'client_id = "{provider.client_id}"\n'
        f'client_secret_file = "{secret_file}"\n'
        f'redirect_url = "{instance.http_url}/api/v1/auth/oidc/callback"\n'
        f'role_claim = "{provider.role_claim}"\n'
        'default_role = "viewer"\n'
        'allowed_email_domains = ["example.com"]\n'
    )
    instance.extra_env["FERRITE_CONFIG"] = str(config)
    try:
        instance.start()
    except BaseException:
        instance.stop()
        raise
    yield instance
    exit_code = instance.stop()
    assert "panicked" not in instance.log_text(), instance.log_tail()
    assert exit_code == 0, instance.log_tail()


def assert_healthy(server: FerriteServer) -> None:
    assert requests.get(f"{server.http_url}/healthz", timeout=5).status_code == 200


def create_user(server: FerriteServer, role: str = "viewer") -> tuple[str, str]:
    email = f"user-{uuid.uuid4().hex[:8]}@example.com"
    password = f"quiet river {uuid.uuid4().hex[:6]}"
    response = server.api.post(
        f"{server.http_url}/api/v1/users", json={"email": email, "role": role, "password": password}, timeout=10
    )
    assert response.status_code == 201, response.text
    return email, password


def login(server: FerriteServer, email: str, password: str) -> requests.Response:
    return requests.post(
        f"{server.http_url}/api/v1/auth/login", json={"email": email, "password": password}, timeout=10
    )


def devices_with(server: FerriteServer, token: str) -> requests.Response:
    return requests.get(
        f"{server.http_url}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_token(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """Sign with HMAC-SHA256 whatever the header says: the RS256 header
    with the HMAC key is the classic key confusion attack."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def valid_claims(server: FerriteServer) -> dict[str, Any]:
    me = server.get("/api/v1/auth/me").json()
    now = int(time.time())
    return {
        "iss": "ferrite",
        "aud": "ferrite-api",
        "sub": me["id"],
        "jti": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 600,
        "tenant": me["tenant_id"],
        "role": "admin",
        "kind": "user",
    }


def forged_tokens(server: FerriteServer) -> dict[str, tuple[str, str]]:
    key = (server.data_dir / "jwt.key").read_bytes()
    claims = valid_claims(server)
    at_jwt = {"typ": "at+jwt"}
    expired = {**claims, "exp": int(time.time()) - 120}
    no_exp = {name: value for name, value in claims.items() if name != "exp"}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    genuine_viewer = jwt.encode({**claims, "role": "viewer"}, key, algorithm="HS256", headers=at_jwt)
    header, _, signature = genuine_viewer.split(".")
    tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    return {
        "alg none": (jwt.encode(claims, None, algorithm="none", headers=at_jwt), '"none"'),
        "HS256 with a wrong key": (
            jwt.encode(claims, b"w" * 32, algorithm="HS256", headers=at_jwt),
            "signature",
        ),
        "RS256 signed with an RSA key": (jwt.encode(claims, rsa_key, algorithm="RS256", headers=at_jwt), "RS256"),
        "RS256 header with the HMAC key": (hmac_token({"alg": "RS256", "typ": "at+jwt"}, claims, key), "RS256"),
        "expired": (jwt.encode(expired, key, algorithm="HS256", headers=at_jwt), "expired"),
        "tampered payload": (tampered, "signature"),
        "missing exp": (jwt.encode(no_exp, key, algorithm="HS256", headers=at_jwt), "exp"),
        "typ JWT": (jwt.encode(claims, key, algorithm="HS256"), "typ"),
    }


def test_genuine_forgery_baseline_is_accepted(server: FerriteServer) -> None:
    """The forging code itself is right: with every check met, the server
    accepts the token, so the rejections below are for the stated reason."""
    key = (server.data_dir / "jwt.key").read_bytes()
    token = jwt.encode(valid_claims(server), key, algorithm="HS256", headers={"typ": "at+jwt"})
    assert devices_with(server, token).status_code == 200


@pytest.mark.parametrize(
    "case",
    [
        "alg none",
        "HS256 with a wrong key",
        "RS256 signed with an RSA key",
        "RS256 header with the HMAC key",
        "expired",
        "tampered payload",
        "missing exp",
        "typ JWT",
    ],
)
def test_forged_access_token_rejected(server: FerriteServer, case: str) -> None:
    token, expected = forged_tokens(server)[case]
    response = devices_with(server, token)
    assert response.status_code == 401, response.text
    assert expected in response.json()["detail"], response.text
    assert_healthy(server)


def test_stolen_refresh_token_revokes_family(server: FerriteServer) -> None:
    email, password = create_user(server)
    first = login(server, email, password).json()
    stolen = first["refresh_token"]

    rotated = requests.post(f"{server.http_url}/api/v1/auth/refresh", json={"refresh_token": stolen}, timeout=10)
    assert rotated.status_code == 200, rotated.text
    legit = rotated.json()

    replay = requests.post(f"{server.http_url}/api/v1/auth/refresh", json={"refresh_token": stolen}, timeout=10)
    assert replay.status_code == 401
    assert "already used" in replay.json()["detail"]

    after = requests.post(
        f"{server.http_url}/api/v1/auth/refresh", json={"refresh_token": legit["refresh_token"]}, timeout=10
    )
    assert after.status_code == 401, after.text
    assert devices_with(server, legit["access_token"]).status_code == 401
    assert "probably stolen" in server.log_text()
    assert_healthy(server)


def test_password_guessing_locks_with_retry_after(server: FerriteServer) -> None:
    email, password = create_user(server)
    for attempt in range(5):
        response = login(server, email, f"wrong guess number {attempt}")
        assert response.status_code == 401, response.text
    locked = login(server, email, password)
    assert locked.status_code == 429, locked.text
    assert 1 <= int(locked.headers["Retry-After"]) <= 30
    assert "retry in" in locked.json()["detail"]
    # The admin's login from the same address is not affected.
    assert login(server, ADMIN_EMAIL, "interop-admin-password").status_code == 200
    assert_healthy(server)


def test_weak_password_rejected_with_reason(server: FerriteServer) -> None:
    cases = {"Password2024!": "too common", "short-pw": "at least 12", "aaaaaaaaaaaaaaaa": "different characters"}
    for password, reason in cases.items():
        response = server.api.post(
            f"{server.http_url}/api/v1/users",
            json={"email": "weak@example.com", "role": "viewer", "password": password},
            timeout=10,
        )
        assert response.status_code == 400, response.text
        assert reason in response.json()["detail"], response.text


def create_service_account(server: FerriteServer, scopes: list[str]) -> dict[str, Any]:
    response = server.api.post(
        f"{server.http_url}/api/v1/service-accounts",
        json={"name": f"svc-{uuid.uuid4().hex[:6]}", "role": "operator", "scopes": scopes},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_client_credentials_with_authlib(server: FerriteServer, auth_method: str) -> None:
    account = create_service_account(server, ["devices:read", "telemetry:read"])
    client = OAuth2Session(
        account["client_id"],
        account["client_secret"],
        scope="devices:read",
        token_endpoint_auth_method=auth_method,
    )
    token = client.fetch_token(f"{server.http_url}/api/v1/oauth/token", grant_type="client_credentials")
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "devices:read"
    assert 0 < token["expires_in"] <= 900
    assert client.get(f"{server.http_url}/api/v1/devices", timeout=10).status_code == 200
    assert client.get(f"{server.http_url}/api/v1/telemetry/latest", timeout=10).status_code == 403


def test_client_credentials_errors_follow_rfc6749(server: FerriteServer) -> None:
    account = create_service_account(server, ["devices:read"])
    url = f"{server.http_url}/api/v1/oauth/token"
    wrong = OAuth2Session(account["client_id"], "fss_wrong-secret")
    with pytest.raises(Exception) as raised:
        wrong.fetch_token(url, grant_type="client_credentials")
    assert getattr(raised.value, "error", None) == "invalid_client"

    auth = (account["client_id"], account["client_secret"])
    cases = [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": "devices:write"}, 400, "invalid_scope"),
        ({"grant_type": "client_credentials", "scope": "no-such-scope"}, 400, "invalid_scope"),
        ({}, 400, "invalid_request"),
    ]
    for form, status, error in cases:
        response = requests.post(url, data=form, auth=auth, timeout=10)
        assert response.status_code == status, (form, response.text)
        assert response.json()["error"] == error, (form, response.text)
        assert "error_description" in response.json()
    assert_healthy(server)


def oidc_login(server: FerriteServer) -> requests.Response:
    """Run the browser's part: Ferrite redirects to the provider, which
    redirects back to Ferrite's callback with a code."""
    return requests.get(f"{server.http_url}/api/v1/auth/oidc/login", timeout=10, allow_redirects=True)


def test_oidc_login_creates_user_with_claimed_role(server: FerriteServer, provider: OidcProvider) -> None:
    email = f"new-{uuid.uuid4().hex[:6]}@example.com"
    provider.next_login = Login(email=email, role="operator")
    response = oidc_login(server)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["role"] == "operator"
    assert tokens["refresh_token"].startswith("frt_")
    me = requests.get(
        f"{server.http_url}/api/v1/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}, timeout=10
    ).json()
    assert me["email"] == email
    assert me["role"] == "operator"
    exchange = provider.token_requests[-1]
    assert exchange["grant_type"] == "authorization_code"
    assert len(exchange["code_verifier"]) >= 43

    # The second login finds the same user.
    provider.next_login = Login(email=email)
    again = oidc_login(server)
    assert again.status_code == 200, again.text
    assert again.json()["role"] == "operator"


def test_oidc_login_uses_default_role(server: FerriteServer, provider: OidcProvider) -> None:
    provider.next_login = Login(email=f"plain-{uuid.uuid4().hex[:6]}@example.com")
    response = oidc_login(server)
    assert response.status_code == 200, response.text
    assert response.json()["role"] == "viewer"


@pytest.mark.parametrize(
    ("fault", "status", "reason"),
    [
        ("wrong_audience", 401, "ID token is invalid"),
        ("wrong_nonce", 401, "nonce"),
        ("expired", 401, "ID token is invalid"),
        ("foreign_key", 401, "ID token is invalid"),
    ],
)
def test_oidc_rejects_bad_id_token(
    server: FerriteServer, provider: OidcProvider, fault: str, status: int, reason: str
) -> None:
    provider.next_login = Login(email=f"victim-{uuid.uuid4().hex[:6]}@example.com")
    setattr(provider, fault, True)
    try:
        response = oidc_login(server)
    finally:
        setattr(provider, fault, False)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"], response.text
    assert_healthy(server)


@pytest.mark.parametrize(
    ("login", "reason"),
    [
        (Login(email="intruder@elsewhere.org", role="admin"), "domain"),
        (Login(email="unverified@example.com", email_verified=False), "not verified"),
    ],
)
def test_oidc_rejects_disallowed_email(
    server: FerriteServer, provider: OidcProvider, login: Login, reason: str
) -> None:
    provider.next_login = login
    response = oidc_login(server)
    assert response.status_code == 403, response.text
    assert reason in response.json()["detail"]


def test_oidc_state_works_once(server: FerriteServer, provider: OidcProvider) -> None:
    provider.next_login = Login(email=f"replay-{uuid.uuid4().hex[:6]}@example.com")
    start = requests.get(f"{server.http_url}/api/v1/auth/oidc/login", timeout=10, allow_redirects=False)
    assert start.status_code in (302, 303), start.text
    authorize = requests.get(start.headers["Location"], timeout=10, allow_redirects=False)
    callback = authorize.headers["Location"]
    assert requests.get(callback, timeout=10).status_code == 200
    replay = requests.get(callback, timeout=10)
    assert replay.status_code == 400, replay.text
    forged = requests.get(
        f"{server.http_url}/api/v1/auth/oidc/callback", params={"code": "x", "state": "guessed"}, timeout=10
    )
    assert forged.status_code == 400


def test_security_headers(server: FerriteServer) -> None:
    for path in ("/healthz", "/api/v1/devices", "/api/v1/no-such-endpoint"):
        response = requests.get(f"{server.http_url}{path}", timeout=10)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["X-Frame-Options"] == "DENY", path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
        assert "default-src 'none'" in response.headers["Content-Security-Policy"], path
    token_response = login(server, ADMIN_EMAIL, "interop-admin-password")
    assert token_response.headers["Cache-Control"] == "no-store"

