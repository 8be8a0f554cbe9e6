"""Configuration shared by every service.

Each service has one ``BaseSettings`` class with its own env prefix (``GEMMA_``,
``TRANSCRIPTION_``, ``RAG_``, ``COORDINATOR_``), so one compose file cannot
collide. Authentication is configured once for all services with ``JWT_*``.

Secrets are ``SecretStr`` with no default. Every secret ``X`` may instead be read
from the file named by ``X_FILE`` (docker secrets). Placeholder values are refused at
start-up, and every configuration error names the environment variable to set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MIN_SECRET_BYTES = 32

_PLACEHOLDER = re.compile(
    r"^(change[-_ ]?(me|this|it)|replace[-_ ]?me|your[-_ ].*|secret|password|placeholder|"
    r"example|todo|xxx+|dev|test|<.*>|\$\{.*\}|null|none)$",
    re.IGNORECASE,
)


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable to set."""


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.match(value.strip()))


def check_secret(value: SecretStr | None, *, min_bytes: int = 0) -> SecretStr | None:
    """Refuse placeholder values and (optionally) secrets shorter than ``min_bytes``."""
    if value is None:
        return None
    raw = value.get_secret_value()
    if not raw.strip() or is_placeholder(raw):
        raise ValueError("is a placeholder, not a secret")
    if len(raw.encode()) < min_bytes:
        raise ValueError(f"is shorter than {min_bytes} bytes")
    return value


class _FileVariantSource(PydanticBaseSettingsSource):
    """Reads ``<PREFIX><NAME>_FILE`` for every secret field (docker secrets)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ does the work

    def __call__(self) -> dict[str, Any]:
        prefix = self.config.get("env_prefix", "")
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            if not _is_secret(field):
                continue
            var = f"{prefix}{name}_FILE".upper()
            path = os.environ.get(var)
            if not path:
                continue
            try:
                values[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{var}={path} cannot be read: {exc.strerror}") from None
        return values


def _is_secret(field: FieldInfo) -> bool:
    annotation = field.annotation
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())


class BatonSettings(BaseSettings):
    """Base class: environment first, then ``*_FILE`` variants, then defaults."""

    model_config = SettingsConfigDict(extra="ignore", env_nested_delimiter="__")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileVariantSource(settings_cls))

    @classmethod
    def env_name(cls, field_name: str) -> str:
        """The environment variable that sets ``field_name``."""
        field = cls.model_fields[field_name]
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            first = alias.choices[0]
            if isinstance(first, str):
                return first
        if isinstance(alias, str):
            return alias
        return f"{cls.model_config.get('env_prefix', '')}{field_name}".upper()


class AuthSettings(BatonSettings):
    """How every service verifies bearer tokens, and how it signs its own."""

    model_config = SettingsConfigDict(env_prefix="JWT_")

    algorithm: Literal["HS256", "RS256"] = "HS256"
    """HS256 with a shared secret (default), or RS256 with a public key file."""
    secret: SecretStr | None = None
    """HS256 signing key, at least 32 random bytes. Required for HS256."""
    public_key_file: Path | None = None
    """PEM public key that verifies RS256 tokens (e.g. from your identity provider)."""
    private_key_file: Path | None = None
    """PEM private key used to sign service and development tokens under RS256."""
    issuer: str = "baton"
    """Required ``iss`` claim."""
    audience: str = "baton"
    """Required ``aud`` claim."""
    leeway_s: int = Field(default=30, ge=0, le=60)
    """Clock skew tolerated on ``exp``/``iat``/``nbf``, at most 60 s."""
    max_token_bytes: int = Field(default=8192, ge=256, le=8192)
    """Tokens larger than this are refused before parsing."""
    max_lifetime_s: int = Field(default=400 * 86400, ge=60)
    """Tokens whose ``exp - iat`` exceeds this are refused (default 400 days: a
    year-long scraper token passes, a 100-year one does not)."""
    service_token_ttl_s: int = Field(default=120, ge=10, le=900)
    """Lifetime of the short-lived tokens services mint for each other."""
    only: bool = True
    """``JWT_ONLY``: accept JWTs only. False also accepts static API keys."""
    api_keys_file: Path | None = None
    """With ``JWT_ONLY=false``: lines of ``subject scope[,scope...] key``."""

    @field_validator("secret")
    @classmethod
    def _secret_is_real(cls, value: SecretStr | None) -> SecretStr | None:
        return check_secret(value, min_bytes=MIN_SECRET_BYTES)

    def check_complete(self, *, needs_signing: bool) -> None:
        """Refuse a configuration that cannot verify (or, if asked, sign) tokens."""
        if self.algorithm == "HS256" and self.secret is None:
            raise ConfigError(
                "JWT_SECRET is not set. Set JWT_SECRET (or JWT_SECRET_FILE) to at least "
                f"{MIN_SECRET_BYTES} random bytes, for example the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`."
            )
        if self.algorithm == "RS256":
            if self.public_key_file is None:
                raise ConfigError("JWT_ALGORITHM=RS256 needs JWT_PUBLIC_KEY_FILE (a PEM public key).")
            if needs_signing and self.private_key_file is None:
                raise ConfigError(
                    "This service signs service tokens: with JWT_ALGORITHM=RS256 set "
                    "JWT_PRIVATE_KEY_FILE (a PEM private key matching JWT_PUBLIC_KEY_FILE)."
                )
        if not self.only and self.api_keys_file is None:
            raise ConfigError("JWT_ONLY=false needs JWT_API_KEYS_FILE (lines of 'subject scopes key').")


class LimitSettings(BatonSettings):
    """Per-subject limits and the audit stream, shared by every service (``BATON_*``)."""

    model_config = SettingsConfigDict(env_prefix="BATON_")

    redis_url: str | None = None
    """Redis holding the limits and the audit stream of every service. Unset: no limits,
    and the audit events stay in the logs and in each process's memory."""
    key_prefix: str = Field(default="baton:", min_length=1, max_length=64)
    """Prefix of every Redis key, so tests and stacks can share one Redis."""
    limit_rpm: int = Field(default=600, ge=0)
    """Requests per minute per subject, all services together (0: no limit)."""
    limit_streams: int = Field(default=4, ge=0)
    """Streams (streamed answers, streamed transcriptions, event streams) open at once
    per subject (0: no limit)."""
    limit_jobs: int = Field(default=8, ge=0)
    """Transcription jobs queued or running per subject (0: no limit)."""
    limit_stored_mb: float = Field(default=256.0, ge=0)
    """Text stored in RAG per subject, documents and transcripts (0: no limit)."""
    audit_max_events: int = Field(default=100_000, ge=100, le=10_000_000)
    """The audit stream keeps about this many of the newest events."""

    def public(self) -> dict[str, Any]:
        """The limits a user may know."""
        if self.redis_url is None:
            return {}
        return {
            "requests_per_minute": self.limit_rpm or None,
            "streams": self.limit_streams or None,
            "queued_jobs": self.limit_jobs or None,
            "stored_mb": self.limit_stored_mb or None,
        }


class ServiceSettings(BatonSettings):
    """What every service has: where it listens and how it logs."""

    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port to bind."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the service's JSON logs."""
    max_body_mb: float = Field(default=1.0, gt=0, le=1024)
    """Requests with a larger body are refused with 413."""
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """A connection that has not sent a whole request line and headers this long after it
    opened is closed (slow or idle clients do not hold connections)."""
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """A request body that stops arriving for this long is cut."""
    idle_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    """A kept-alive connection with no new request this long is closed."""
    limits: LimitSettings = Field(default_factory=LimitSettings)
    """Per-subject limits and the audit stream (``BATON_*``), the same for every service."""


S = TypeVar("S", bound=BatonSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build ``cls`` from the environment; errors name the variables to fix."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        # A nested settings class (AuthSettings inside a service's) reports its own errors.
        owner = _subclass_named(BatonSettings, exc.title) or cls
        problems = []
        for error in exc.errors():
            loc = error["loc"]
            field = str(loc[0]) if loc else ""
            var = owner.env_name(field) if field in owner.model_fields else field.upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{var}: {message}" if var else message)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _subclass_named(base: type[BatonSettings], name: str) -> type[BatonSettings] | None:
    for sub in base.__subclasses__():
        if sub.__name__ == name:
            return sub
        found = _subclass_named(sub, name)
        if found is not None:
            return found
    return None
