"""Bearer-token verification and signing, hardened around python-jose.

python-jose fails open in several ways: with no ``algorithms`` it trusts the token
header, it parses string keys as JSON key sets, it skips ``aud`` when the token has
none, and it checks ``iss`` only when asked. This module closes each of those:

- the algorithm is fixed by configuration and the key is a typed ``jwk`` key object;
- ``exp``, ``iat``, ``iss``, ``aud`` and ``sub`` are required, with at most 60 s leeway;
- tokens larger than ``JWT_MAX_TOKEN_BYTES`` are refused before any parsing;
- JWE (five segments) and unknown critical headers are refused;
- static API keys (only with ``JWT_ONLY=false``) are compared in constant time.

Nothing here imports FastAPI; :mod:`shared.web` turns the errors into 401/403.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jose import jwk, jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError

from shared.settings import AuthSettings, ConfigError

SCOPES = ("chat", "transcribe", "rag:read", "rag:write", "rag:share", "gpu", "admin")
"""Every scope a token may carry, space-separated in its ``scope`` claim."""

SERVICE_SUBJECT_PREFIX = "service:"
ON_BEHALF_OF = "X-Baton-On-Behalf-Of"
"""The header a service sends with its own token to act for a user (that user's
subject). Trusted only from service tokens."""
MAX_SUBJECT = 256

T = TypeVar("T")


class InvalidToken(Exception):
    """The credentials are missing, malformed, forged or expired (HTTP 401)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may do."""

    subject: str
    scopes: frozenset[str]
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_service(self) -> bool:
        return self.subject.startswith(SERVICE_SUBJECT_PREFIX)

    def has_any(self, scopes: Iterable[str]) -> bool:
        return any(scope in self.scopes for scope in scopes)


def _parse_scopes(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise InvalidToken("the scope claim must be a space-separated string")


class TokenVerifier:
    """Verifies bearer credentials against one fixed algorithm and key.

    Verified tokens are cached (service tokens are reused for their lifetime): a hit
    skips the signature check, never the time checks.
    """

    CACHE_SIZE = 1024

    def __init__(self, settings: AuthSettings) -> None:
        settings.check_complete(needs_signing=False)
        self._settings = settings
        self._algorithm = settings.algorithm
        self._key = _verification_key(settings)
        self._api_keys = _load_api_keys(settings.api_keys_file) if not settings.only else []
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_lock = threading.Lock()

    def verify(self, credential: str) -> Principal:
        if len(credential.encode("utf-8", "surrogatepass")) > self._settings.max_token_bytes:
            raise InvalidToken("token too large")
        segments = credential.count(".") + 1
        if segments == 5:
            raise InvalidToken("encrypted tokens (JWE) are not accepted")
        if segments != 3:
            principal = self._match_api_key(credential)
            if principal is not None:
                return principal
            raise InvalidToken("malformed token")
        cached = self._cached(credential)
        if cached is not None:
            return cached
        _check_canonical(credential)
        principal = self._verify_jwt(credential)
        with self._cache_lock:
            self._cache[credential] = principal
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def _cached(self, token: str) -> Principal | None:
        with self._cache_lock:
            principal = self._cache.get(token)
            if principal is None:
                return None
            now, leeway = time.time(), self._settings.leeway_s
            if now > principal.claims["exp"] + leeway or now < principal.claims.get("nbf", 0) - leeway:
                del self._cache[token]
                return None  # verified again below, and refused as expired
            self._cache.move_to_end(token)
            return principal

    def _verify_jwt(self, token: str) -> Principal:
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != self._algorithm:
                raise InvalidToken("token algorithm not allowed")
            if "crit" in header:
                raise InvalidToken("critical header parameters are not supported")
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=s.audience,
                issuer=s.issuer,
                options={
                    "require_exp": True,
                    "require_iat": True,
                    "require_iss": True,
                    "require_aud": True,
                    "require_sub": True,
                    "leeway": min(s.leeway_s, 60),
                },
            )
        except ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except JWTClaimsError as exc:
            raise InvalidToken(f"invalid claims: {exc}") from None
        except (JWTError, ValueError, TypeError, KeyError):
            raise InvalidToken("invalid token") from None
        issued_at = claims.get("iat")
        if not isinstance(issued_at, int | float) or issued_at > time.time() + s.leeway_s:
            raise InvalidToken("token issued in the future")
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires - issued_at > s.max_lifetime_s:
            raise InvalidToken(f"token lifetime over {s.max_lifetime_s} s (JWT_MAX_LIFETIME_S)")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("the sub claim must be a non-empty string")
        return Principal(subject, _parse_scopes(claims.get("scope", "")), claims)

    def _match_api_key(self, credential: str) -> Principal | None:
        digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for key_digest, principal in self._api_keys:
            # Compare against every key, equal-length digests: no timing signal.
            if hmac.compare_digest(digest, key_digest):
                found = principal
        return found


_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")


def _check_canonical(token: str) -> None:
    """Each segment canonical base64url, unpadded (nothing appended to a signature is
    ignored), and JSON without duplicate names in the header and the claims."""
    segments = token.split(".")
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise InvalidToken("malformed token")
        try:
            raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed token") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != segment:
            raise InvalidToken("malformed token")
    for segment in segments[:2]:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        try:
            json.loads(raw, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            raise InvalidToken(str(exc) if "duplicate" in str(exc) else "malformed token") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate names in the token")
    return dict(pairs)


class TokenIssuer:
    """Signs tokens: development tokens and the short-lived service tokens."""

    def __init__(self, settings: AuthSettings) -> None:
        settings.check_complete(needs_signing=True)
        self._settings = settings
        self._key = _signing_key(settings)

    def mint(
        self,
        subject: str,
        scopes: Iterable[str],
        lifetime_s: float,
        *,
        now: float | None = None,
    ) -> str:
        unknown = set(scopes) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes: {sorted(unknown)}; known: {list(SCOPES)}")
        if not subject:
            raise ValueError("subject must not be empty")
        if lifetime_s > self._settings.max_lifetime_s:
            raise ValueError(f"a lifetime over {self._settings.max_lifetime_s} s is refused (JWT_MAX_LIFETIME_S)")
        issued = int(time.time() if now is None else now)
        claims = {
            "sub": subject,
            "scope": " ".join(sorted(set(scopes))),
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(lifetime_s),
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, self._key, algorithm=self._settings.algorithm)


class ServiceTokens:
    """A cached short-lived token of one service (``sub = service:<name>``)."""

    def __init__(self, issuer: TokenIssuer, service: str, scopes: Iterable[str], ttl_s: int) -> None:
        self._issuer = issuer
        self._subject = f"{SERVICE_SUBJECT_PREFIX}{service}"
        self._scopes = tuple(scopes)
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._token = ""
        self._renew_at = 0.0

    def __call__(self) -> str:
        with self._lock:
            now = time.monotonic()
            if now >= self._renew_at:
                self._token = self._issuer.mint(self._subject, self._scopes, self._ttl_s)
                self._renew_at = now + self._ttl_s / 2
            return self._token


def _verification_key(settings: AuthSettings) -> Any:
    if settings.algorithm == "HS256":
        secret = _required(settings.secret, "JWT_SECRET")
        return jwk.construct(secret.get_secret_value().encode(), "HS256")
    pem = _read_key(_required(settings.public_key_file, "JWT_PUBLIC_KEY_FILE"), "JWT_PUBLIC_KEY_FILE")
    if "PRIVATE KEY" in pem:
        raise ConfigError("JWT_PUBLIC_KEY_FILE holds a private key; give the public key.")
    try:
        return jwk.construct(pem, "RS256")
    except JWTError as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY_FILE is not an RSA public key: {exc}") from None


def _signing_key(settings: AuthSettings) -> Any:
    if settings.algorithm == "HS256":
        return _verification_key(settings)
    path = _required(settings.private_key_file, "JWT_PRIVATE_KEY_FILE")
    pem = _read_key(path, "JWT_PRIVATE_KEY_FILE")
    try:
        return jwk.construct(pem, "RS256")
    except JWTError as exc:
        raise ConfigError(f"JWT_PRIVATE_KEY_FILE is not an RSA private key: {exc}") from None


def _required(value: T | None, var: str) -> T:
    if value is None:
        raise ConfigError(f"{var} is not set")
    return value


def _read_key(path: Path, var: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{var}={path} cannot be read: {exc.strerror}") from None


def _load_api_keys(path: Path | None) -> list[tuple[bytes, Principal]]:
    if path is None:
        return []
    keys = []
    text = _read_key(path, "JWT_API_KEYS_FILE")
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"JWT_API_KEYS_FILE line {number}: expected 'subject scopes key'")
        subject, scopes, key = parts
        wanted = frozenset(scopes.split(","))
        if not wanted <= set(SCOPES):
            raise ConfigError(f"JWT_API_KEYS_FILE line {number}: unknown scope")
        if len(key.encode()) < 32 or "." in key:
            raise ConfigError(f"JWT_API_KEYS_FILE line {number}: keys need at least 32 bytes and no '.'")
        principal = Principal(subject, wanted, {"sub": subject, "api_key": True})
        keys.append((hashlib.sha256(key.encode()).digest(), principal))
    return keys
