"""A minimal OpenID Connect provider for tests, on 127.0.0.1.

It serves the discovery document, a JWKS with one RSA key, an
authorization endpoint that logs in `next_login` at once (no login page)
and redirects back with a code, and a token endpoint that checks the
client secret, the redirect URI and the PKCE verifier before it returns an
RS256 ID token. Attributes let a test make the ID token wrong in one way
(audience, nonce, expiry, signing key) to see the server reject it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def int_to_b64url(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class Login:
    """Who logs in at the next authorization request."""

    email: str
    role: str | None = None
    email_verified: bool = True


@dataclass
class PendingCode:
    login: Login
    nonce: str
    challenge: str
    redirect_uri: str


@dataclass
class OidcProvider:
    client_id: str = "ferrite-test"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    role_claim: str = "ferrite_role"
    next_login: Login | None = None
    # Faults to inject into the next ID token.
    wrong_audience: bool = False
    wrong_nonce: bool = False
    expired: bool = False
    foreign_key: bool = False
    # What the token endpoint received, for assertions.
    token_requests: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        self.codes: dict[str, PendingCode] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "OidcProvider":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "kid": self.kid,
                    "use": "sig",
                    "alg": "RS256",
                    "n": int_to_b64url(numbers.n),
                    "e": int_to_b64url(numbers.e),
                }
            ]
        }

    def id_token(self, pending: PendingCode) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": hashlib.sha256(pending.login.email.encode()).hexdigest()[:16],
            "aud": "someone-else" if self.wrong_audience else self.client_id,
            "iat": now,
            "exp": now - 600 if self.expired else now + 300,
            "nonce": "not-the-nonce" if self.wrong_nonce else pending.nonce,
            "email": pending.login.email,
            "email_verified": pending.login.email_verified,
        }
        if pending.login.role is not None:
            claims[self.role_claim] = pending.login.role
        key = self.other_key if self.foreign_key else self.key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": self.kid})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def send_json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                if url.path == "/.well-known/openid-configuration":
                    self.send_json(
                        200,
                        {
                            "issuer": provider.issuer,
                            "authorization_endpoint": f"{provider.issuer}/authorize",
                            "token_endpoint": f"{provider.issuer}/token",
                            "jwks_uri": f"{provider.issuer}/jwks",
                            "response_types_supported": ["code"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256"],
                            "code_challenge_methods_supported": ["S256"],
                        },
                    )
                elif url.path == "/jwks":
                    self.send_json(200, provider.jwks())
                elif url.path == "/authorize":
                    self.authorize({name: values[0] for name, values in parse_qs(url.query).items()})
                else:
                    self.send_json(404, {"error": "not_found"})

            def authorize(self, params: dict[str, str]) -> None:
                required = ("response_type", "client_id", "redirect_uri", "state", "nonce", "code_challenge")
                if any(name not in params for name in required) or params["response_type"] != "code":
                    self.send_json(400, {"error": "invalid_request", "params": params})
                    return
                if params["client_id"] != provider.client_id or params.get("code_challenge_method") != "S256":
                    self.send_json(400, {"error": "unauthorized_client"})
                    return
                if provider.next_login is None:
                    self.send_json(400, {"error": "access_denied"})
                    return
                code = secrets.token_urlsafe(16)
                provider.codes[code] = PendingCode(
                    login=provider.next_login,
                    nonce=params["nonce"],
                    challenge=params["code_challenge"],
                    redirect_uri=params["redirect_uri"],
                )
                location = f"{params['redirect_uri']}?{urlencode({'code': code, 'state': params['state']})}"
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802
                if urlparse(self.path).path != "/token":
                    self.send_json(404, {"error": "not_found"})
                    return
                length = int(self.headers.get("Content-Length", "0"))
                form = {name: values[0] for name, values in parse_qs(self.rfile.read(length).decode()).items()}
                provider.token_requests.append(form)
                expected = base64.b64encode(f"{provider.client_id}:{provider.client_secret}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {expected}":
                    self.send_json(401, {"error": "invalid_client"})
                    return
                pending = provider.codes.pop(form.get("code", ""), None)
                if pending is None or form.get("grant_type") != "authorization_code":
                    self.send_json(400, {"error": "invalid_grant", "error_description": "unknown or used code"})
                    return
                if form.get("redirect_uri") != pending.redirect_uri:
                    self.send_json(400, {"error": "invalid_grant", "error_description": "redirect_uri differs"})
                    return
                verifier = form.get("code_verifier", "")
                if b64url(hashlib.sha256(verifier.encode()).digest()) != pending.challenge:
                    self.send_json(400, {"error": "invalid_grant", "error_description": "PKCE verification failed"})
                    return
                self.send_json(
                    200,
                    {
                        "access_token": secrets.token_urlsafe(16),
                        "token_type": "Bearer",
                        "expires_in": 300,
                        "id_token": provider.id_token(pending),
                    },
                )

        return Handler
