"""Every way a bearer token can be wrong, refused over real HTTP with the right status."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI
from jose import jwe, jwt
from pydantic import SecretStr

from harness.servers import UvicornThread
from shared.auth import InvalidToken, TokenIssuer, TokenVerifier
from shared.metrics import Metrics
from shared.settings import AuthSettings, ConfigError
from shared.web import Auth, create_service_app


def build_app(settings: AuthSettings) -> FastAPI:
    auth = Auth(TokenVerifier(settings))
    app = create_service_app(name="authtest", auth=auth, metrics=Metrics("authtest"), max_body_bytes=1 << 20)

    @app.get("/needs-chat", dependencies=[Depends(auth.require("chat"))])
    async def needs_chat() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def hs_server(auth_settings: AuthSettings) -> Iterator[UvicornThread]:
    with UvicornThread(build_app(auth_settings)) as server:
        yield server


def b64(data: dict[str, object] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "alice",
        "scope": "chat",
        "iss": "baton",
        "aud": "baton",
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def get(server: UvicornThread, path: str, token: str | None, scheme: str = "Bearer") -> httpx.Response:
    headers = {"Authorization": f"{scheme} {token}".strip()} if token is not None else {}
    return httpx.get(server.url + path, headers=headers)


def assert_refused(response: httpx.Response, status: int = 401) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_valid_token_with_the_scope_is_accepted(hs_server: UvicornThread, jwt_secret: str) -> None:
    token = jwt.encode(claims(), jwt_secret, algorithm="HS256")
    response = get(hs_server, "/needs-chat", token)
    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_no_token(hs_server: UvicornThread) -> None:
    response = get(hs_server, "/v1/info", None)
    assert_refused(response)
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("scheme", "token"),
    [("Bearer", "not-a-jwt"), ("Bearer", "a.b.c"), ("Basic", "dXNlcjpwYXNz"), ("Bearer", "")],
    ids=["garbage", "three-garbage-segments", "basic-scheme", "empty"],
)
def test_malformed(hs_server: UvicornThread, scheme: str, token: str) -> None:
    assert_refused(get(hs_server, "/v1/info", token, scheme))


def test_alg_none(hs_server: UvicornThread) -> None:
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    assert_refused(get(hs_server, "/v1/info", token))


@pytest.mark.parametrize(
    "bad",
    [
        {"aud": "someone-else"},
        {"iss": "evil"},
        {"exp": int(time.time()) - 3600},
        {"exp": None},
        {"iat": None},
        {"sub": None},
        {"aud": None},
        {"iss": None},
        {"iat": int(time.time()) + 3600},
    ],
    ids=[
        "wrong-aud",
        "wrong-iss",
        "expired",
        "missing-exp",
        "missing-iat",
        "missing-sub",
        "missing-aud",
        "missing-iss",
        "issued-in-future",
    ],
)
def test_bad_claims(hs_server: UvicornThread, jwt_secret: str, bad: dict[str, object]) -> None:
    token = jwt.encode(claims(**bad), jwt_secret, algorithm="HS256")
    assert_refused(get(hs_server, "/v1/info", token))


def test_expired_within_leeway_is_accepted(hs_server: UvicornThread, jwt_secret: str) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), jwt_secret, algorithm="HS256")
    assert get(hs_server, "/v1/info", token).status_code == 200


def test_tampered_payload(hs_server: UvicornThread, jwt_secret: str) -> None:
    header, _, signature = jwt.encode(claims(), jwt_secret, algorithm="HS256").split(".")
    forged = f"{header}.{b64(claims(scope='chat admin gpu'))}.{signature}"
    assert_refused(get(hs_server, "/v1/info", forged))


def test_wrong_secret(hs_server: UvicornThread) -> None:
    token = jwt.encode(claims(), "x" * 48, algorithm="HS256")
    assert_refused(get(hs_server, "/v1/info", token))


def test_token_over_8kb_is_refused_before_parsing(hs_server: UvicornThread, jwt_secret: str) -> None:
    token = jwt.encode(claims(padding="p" * 9000), jwt_secret, algorithm="HS256")
    response = get(hs_server, "/v1/info", token)
    assert_refused(response)
    assert "too large" in response.json()["error"]["message"]


def test_jwe_is_refused(hs_server: UvicornThread, jwt_secret: str) -> None:
    key = jwt_secret.encode()[:32]
    token = jwe.encrypt(json.dumps(claims()), key, algorithm="dir", encryption="A256GCM").decode()
    assert token.count(".") == 4
    response = get(hs_server, "/v1/info", token)
    assert_refused(response)
    assert "JWE" in response.json()["error"]["message"]


def test_missing_scope_is_403(hs_server: UvicornThread, jwt_secret: str) -> None:
    token = jwt.encode(claims(scope="rag:read transcribe"), jwt_secret, algorithm="HS256")
    response = get(hs_server, "/needs-chat", token)
    assert_refused(response, 403)
    assert response.json()["error"]["type"] == "permission_error"
    assert 'scope="chat"' in response.headers["www-authenticate"]


def test_health_and_ready_need_no_token(hs_server: UvicornThread) -> None:
    assert httpx.get(hs_server.url + "/health").status_code == 200
    assert httpx.get(hs_server.url + "/ready").status_code == 200


def test_metrics_need_admin(hs_server: UvicornThread, jwt_secret: str) -> None:
    assert_refused(get(hs_server, "/metrics", jwt.encode(claims(), jwt_secret, algorithm="HS256")), 403)
    admin = jwt.encode(claims(scope="admin"), jwt_secret, algorithm="HS256")
    response = get(hs_server, "/metrics", admin)
    assert response.status_code == 200
    assert "http_requests_total" in response.text


# -- RS256 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("rsa")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = folder / "private.pem"
    public = folder / "public.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def rs_server(rsa_keys: tuple[Path, Path]) -> Iterator[UvicornThread]:
    settings = AuthSettings(algorithm="RS256", public_key_file=rsa_keys[1])
    with UvicornThread(build_app(settings)) as server:
        yield server


def test_rs256_token_is_accepted(rs_server: UvicornThread, rsa_keys: tuple[Path, Path]) -> None:
    token = jwt.encode(claims(), rsa_keys[0].read_text(), algorithm="RS256")
    assert get(rs_server, "/needs-chat", token).status_code == 200


def test_hs256_signed_with_the_public_key_is_refused(rs_server: UvicornThread, rsa_keys: tuple[Path, Path]) -> None:
    """The classic algorithm confusion: the public key used as an HMAC secret."""
    public_pem = rsa_keys[1].read_bytes()
    header = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64(claims())
    import hashlib
    import hmac

    signature = b64(hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert_refused(get(rs_server, "/v1/info", f"{header}.{payload}.{signature}"))


def test_rs256_needs_a_public_key_file() -> None:
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY_FILE"):
        TokenVerifier(AuthSettings(algorithm="RS256"))


def test_rs256_signing_needs_the_private_key(rsa_keys: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="JWT_PRIVATE_KEY_FILE"):
        TokenIssuer(AuthSettings(algorithm="RS256", public_key_file=rsa_keys[1]))
    issuer = TokenIssuer(AuthSettings(algorithm="RS256", public_key_file=rsa_keys[1], private_key_file=rsa_keys[0]))
    verifier = TokenVerifier(AuthSettings(algorithm="RS256", public_key_file=rsa_keys[1]))
    principal = verifier.verify(issuer.mint("service:llm", ["rag:read"], 60))
    assert principal.subject == "service:llm"
    assert principal.is_service
    assert principal.scopes == {"rag:read"}


# -- API keys (JWT_ONLY=false) ------------------------------------------------------


def test_api_keys_only_when_jwt_only_is_false(tmp_path: Path, auth_settings: AuthSettings) -> None:
    key = "k" * 40
    keys = tmp_path / "keys"
    keys.write_text(f"# subject scopes key\nlegacy-client chat,rag:read {key}\n")
    strict = TokenVerifier(auth_settings)
    with pytest.raises(InvalidToken):
        strict.verify(key)
    relaxed = TokenVerifier(auth_settings.model_copy(update={"only": False, "api_keys_file": keys}))
    principal = relaxed.verify(key)
    assert principal.subject == "legacy-client"
    assert principal.scopes == {"chat", "rag:read"}
    with pytest.raises(InvalidToken):
        relaxed.verify("k" * 39 + "j")


def test_leeway_is_capped_at_60_seconds() -> None:
    with pytest.raises(ValueError, match="leeway_s"):
        AuthSettings(secret=SecretStr("s" * 48), leeway_s=120)


def _hs256(header: str, payload: str, secret: str) -> str:
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def test_only_canonical_signatures_pass(hs_server: UvicornThread, jwt_secret: str) -> None:
    token = jwt.encode(claims(), jwt_secret, algorithm="HS256")
    assert get(hs_server, "/needs-chat", token).status_code == 200
    assert_refused(get(hs_server, "/needs-chat", token + "!!!"))
    # The same signature bytes spelt another way (the last character's unused bits).
    head, _, signature = token.rpartition(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    twin = alphabet[last ^ 1] if len(signature) % 4 else alphabet[last]  # 43 chars: 2 unused bits
    assert base64.urlsafe_b64decode(signature[:-1] + twin + "=") == base64.urlsafe_b64decode(signature + "=")
    assert_refused(get(hs_server, "/needs-chat", f"{head}.{signature[:-1]}{twin}"))


def test_duplicate_claims_and_headers_are_refused(hs_server: UvicornThread, jwt_secret: str) -> None:
    header = b64({"alg": "HS256", "typ": "JWT"})
    body = json.dumps(claims()).rstrip("}") + ', "sub": "mallory"}'
    assert_refused(get(hs_server, "/needs-chat", _hs256(header, b64(body.encode()), jwt_secret)))
    token = jwt.encode(claims(), jwt_secret, algorithm="HS256")
    twice = httpx.get(
        hs_server.url + "/needs-chat", headers=[("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")]
    )
    assert_refused(twice)


def test_lifetimes_are_bounded(hs_server: UvicornThread, jwt_secret: str, auth_settings: AuthSettings) -> None:
    now = int(time.time())
    year = jwt.encode(claims(exp=now + 365 * 86400), jwt_secret, algorithm="HS256")  # a scraper's
    assert get(hs_server, "/needs-chat", year).status_code == 200
    century = jwt.encode(claims(exp=now + 100 * 365 * 86400), jwt_secret, algorithm="HS256")
    refused = get(hs_server, "/needs-chat", century)
    assert_refused(refused)
    assert "JWT_MAX_LIFETIME_S" in refused.json()["error"]["message"]
    with pytest.raises(ValueError, match="JWT_MAX_LIFETIME_S"):
        TokenIssuer(auth_settings).mint("prometheus", ["admin"], 100 * 365 * 86400)
