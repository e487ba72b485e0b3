"""Configuration: a TOML file, every key overridable by ``BACKUPD_SECTION__KEY`` env variables.

Validated once at start-up. Unknown keys and wrong types are errors that name the key; so are
``BACKUPD_*`` variables that name no section (``BACKUPD_DATABSE__URL``) unless they are one of
:data:`NON_CONFIG_ENV`, malformed JSON in a whole-section variable (``BACKUPD_BACKENDS``), an
empty path, a config file that is not UTF-8 or not TOML. Secrets (S3 keys, the database
password, tokens) are read from files or env, held as ``SecretStr`` and never printed: error
messages show the offending *key*, and the value only for non-secret keys.

Without a config file (``--config``, ``$BACKUPD_CONFIG`` or :data:`DEFAULT_CONFIG_PATH`) the
environment must at least say where the catalog is (``BACKUPD_DATABASE__URL``): the built-in
default is a production path, and a command must not create a catalog there by accident.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from backupd.errors import ConfigError, scrub
from backupd.sizes import parse_size

#: a workload's recovery point is MISSING after this many schedule intervals (report, alerts)
DEFAULT_STALE_INTERVALS = 3

DEFAULT_CONFIG_PATH = Path("/etc/backupd/config.toml")

ENV_PREFIX = "BACKUPD_"
#: ``BACKUPD_*`` variables that are not config keys: read by commands (restore, verify, inspect)
#: or by the test suite (also every ``BACKUPD_TEST_*``)
NON_CONFIG_ENV = frozenset({
    "BACKUPD_CONFIG", "BACKUPD_AGE_IDENTITY_FILE", "BACKUPD_REGISTRY_PASSWORD",
    "BACKUPD_REQUIRE_POSTGRES", "BACKUPD_FUZZ_EXAMPLES", "BACKUPD_SHARED_DIR", "BACKUPD_BENCH_DATABASE_URL",
})
NON_CONFIG_ENV_PREFIX = "BACKUPD_TEST_"

NO_CONFIG = (f"no config file: give --config FILE, set BACKUPD_CONFIG, or create {DEFAULT_CONFIG_PATH} "
             "(see config/example.toml); or configure by environment alone, with at least BACKUPD_DATABASE__URL")

#: the daemon's HTTP server: seconds a client has to send a whole request, open connections at most
DEFAULT_HTTP_TIMEOUT_SECONDS = 10.0
DEFAULT_HTTP_MAX_CONNECTIONS = 256

Size = Annotated[int, Field(ge=0)]


def _not_empty(value: object) -> object:
    # Path("") is ".": an empty setting would silently mean the current directory.
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty (leave the key out for its default)")
    return value


#: a file or directory setting; "" is refused rather than read as the current directory
ConfigPath = Annotated[Path, BeforeValidator(_not_empty)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseConfig(_Section):
    url: str = "sqlite:////var/lib/backupd/catalog.db"
    #: a file holding the password, substituted into ``url`` (keeps it out of the config file)
    password_file: ConfigPath | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            backend = _database_backend(v)
        except ValueError:
            # the URL may hold a password: never repeat it
            raise ValueError("not a database URL (e.g. sqlite:////var/lib/backupd/catalog.db or "
                             "postgresql+psycopg://user@host/db)") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")
        return v

    def resolved_url(self) -> str:
        """The URL to connect with; contains the password, so never log it (see ``safe_url``)."""
        if self.password_file is None:
            return self.url
        password = _read_secret_file(self.password_file, "database.password_file")
        return _with_password(self.url, quote(password, safe=""))

    def safe_url(self) -> str:
        """The URL with its password, if any, shown as ``***``."""
        return self.url if urlsplit(self.url).password is None else _with_password(self.url, "***")


# ``dialect[+driver]://[user[:password]@]host[:port]/database[?query]``, as SQLAlchemy reads it;
# the catalog parses it with SQLAlchemy when it connects, config only checks and edits it.
_DATABASE_URL = re.compile(r"^[\w+]+://")


def _database_backend(url: str) -> str:
    """The database a URL names (``postgresql`` for ``postgresql+psycopg://``); ValueError
    if it is no database URL."""
    if not _DATABASE_URL.match(url):
        raise ValueError("no dialect://")
    parts = urlsplit(url)
    _ = parts.port  # a port that is not a number raises ValueError
    return parts.scheme.split("+", 1)[0]


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (already percent-quoted) as its password. A URL without a
    ``user@`` part is returned as it is: a password needs one (SQLAlchemy drops it too)."""
    scheme, _, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:{password}@{host}{slash}{tail}"


class KubeletConfig(_Section):
    url: str = "https://127.0.0.1:10250"
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    token_file: ConfigPath | None = None
    checkpoint_dir: ConfigPath = Path("/var/lib/kubelet/checkpoints")
    timeout_seconds: int = Field(default=120, ge=1, le=4 * 3600)
    #: client-side limit on one kubelet request; default max(120, timeout_seconds) + 30, because
    #: the kubelet ignores a ``timeout`` below its 2-minute CRI default
    request_timeout_seconds: float | None = Field(default=None, gt=0)
    node_name: str | None = None

    @field_validator("url")
    @classmethod
    def _https_only(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError(f"the kubelet API is served over HTTPS; got {scrub(v)!r}")
        return v.rstrip("/")

    def request_timeout(self) -> float:
        if self.request_timeout_seconds is not None:
            return self.request_timeout_seconds
        return max(120, self.timeout_seconds) + 30

    def node(self) -> str:
        return self.node_name or os.environ.get("NODE_NAME") or os.uname().nodename


class DaemonConfig(_Section):
    max_concurrent_checkpoints: int = Field(default=2, ge=1, le=64)
    http_listen: str = "127.0.0.1:9790"
    #: when set, the JSON API (/api/v1/*) requires this bearer token; health and metrics stay open
    api_token_file: ConfigPath | None = None
    #: a connection that has not sent a complete request this many seconds after connecting (or
    #: after its previous answer) is closed
    http_timeout_seconds: float = Field(default=DEFAULT_HTTP_TIMEOUT_SECONDS, gt=0, le=300)
    #: open HTTP connections at most; past it the longest-idle one is closed for a newcomer
    http_max_connections: int = Field(default=DEFAULT_HTTP_MAX_CONNECTIONS, ge=8, le=10000)
    #: how long SIGTERM waits for in-flight uploads before giving up on them
    shutdown_grace_seconds: int = Field(default=60, ge=0)
    #: skip checkpoints when the node checkpoint directory has less free space than this
    min_free_space: Size = 1 << 30
    #: node-local tars never committed (left by a crash) are removed after this many hours;
    #: 0 never removes them
    stale_tar_hours: int = Field(default=24, ge=0)
    #: finished run records older than this many days are forgotten
    run_history_days: int = Field(default=90, ge=1)
    #: objects without a manifest older than this many hours are removed by prune
    orphan_grace_hours: float = Field(default=6, gt=0)
    #: ``format = "dedup"``: garbage collection repacks a pack whose live chunks (those some
    #: archive still uses) are fewer than this share of its chunks; 0 never repacks
    repack_below_live_share: float = Field(default=0.5, ge=0, le=1)

    _parse_size = field_validator("min_free_space", mode="before")(lambda cls, v: parse_size(v))

    def api_token(self) -> str | None:
        return _read_secret_file(self.api_token_file, "daemon.api_token_file") if self.api_token_file else None


class _BackendSection(_Section):
    name: str
    #: client-side encryption: archives are age-encrypted to these recipients (age1...) before
    #: they leave the node; restores need a matching identity (``age -d -i`` works too)
    encryption_recipients: list[str] = Field(default_factory=list)

    @field_validator("encryption_recipients")
    @classmethod
    def _recipients(cls, v: list[str]) -> list[str]:
        for i, r in enumerate(v):
            if not re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", r.strip()):
                raise ValueError(f"entry {i} is not an age X25519 recipient (age1 followed by 58 characters)")
        return [r.strip() for r in v]

    #: ``full``: every archive stored whole (zstd, age); ``dedup``: packs of distinct chunks plus a
    #: recipe per archive (docs/dedup-format.md)
    format: Literal["full", "dedup"] = "full"
    #: ``format = "dedup"`` with ``encryption_recipients``: a file holding the repository's chunk id
    #: key (64 hex digits, e.g. ``openssl rand -hex 32``), mode 0600 or stricter; a secret, never logged
    id_key_file: ConfigPath | None = None

    @model_validator(mode="after")
    def _dedup_key(self) -> _BackendSection:
        if self.format == "dedup" and self.encryption_recipients and self.id_key_file is None:
            raise ValueError(f"backends[{self.name}]: format = \"dedup\" with encryption_recipients needs "
                             "id_key_file (chunk ids are keyed so that they reveal nothing of the content)")
        if self.id_key_file is not None and self.format != "dedup":
            raise ValueError(f"backends[{self.name}]: id_key_file is only used with format = \"dedup\"")
        return self

    def id_key(self) -> bytes | None:
        """The chunk id key (32 bytes) from ``id_key_file``; a secret: never log it."""
        if self.id_key_file is None:
            return None
        key = f"backends[{self.name}].id_key_file"
        try:
            mode = self.id_key_file.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {str(self.id_key_file)!r}: {exc.strerror}") from None
        if mode & 0o077:
            raise ConfigError(f"{key}: {str(self.id_key_file)!r} is readable by others (mode {mode & 0o777:o}): "
                              "make it 0600 or 0400 (a Kubernetes secret volume: defaultMode: 0400)")
        text = _read_secret_file(self.id_key_file, key)
        if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
            raise ConfigError(f"{key}: the file must hold 64 hex digits (32 bytes; `openssl rand -hex 32`)")
        return bytes.fromhex(text)


class FilesystemBackendConfig(_BackendSection):
    type: Literal["filesystem"]
    path: ConfigPath


class S3BackendConfig(_BackendSection):
    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    ca_bundle: ConfigPath | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    access_key_id_file: ConfigPath | None = None
    secret_access_key_file: ConfigPath | None = None
    storage_class: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    part_size: Size = 8 << 20
    max_concurrency: int = Field(default=4, ge=1, le=32)

    _parse_size = field_validator("part_size", mode="before")(lambda cls, v: parse_size(v))

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError(f"expected an http(s) URL, got {scrub(v)!r}")
        return v

    def credentials(self) -> tuple[str | None, str | None]:
        key_id = self.access_key_id.get_secret_value() if self.access_key_id else None
        secret = self.secret_access_key.get_secret_value() if self.secret_access_key else None
        if self.access_key_id_file:
            key_id = _read_secret_file(self.access_key_id_file, f"backends[{self.name}].access_key_id_file")
        if self.secret_access_key_file:
            secret = _read_secret_file(self.secret_access_key_file, f"backends[{self.name}].secret_access_key_file")
        return key_id, secret


BackendConfig = Annotated[FilesystemBackendConfig | S3BackendConfig, Field(discriminator="type")]


class AlertsConfig(BaseModel):
    """The ``[alerts]`` config section. No webhook configured means no alerts.

    ``webhook_url`` (or, to keep a secret token out of the config file, ``webhook_url_file``: a
    file holding the URL); ``format`` ``json`` or ``slack``; ``stale_intervals`` N: alert when a
    workload's recovery point is older than N schedule intervals (also the report's threshold for
    MISSING); ``min_interval_seconds`` between two deliveries; ``timeout_seconds`` per delivery;
    ``ca_file`` to verify an internal CA (TLS is always verified); ``send_recovery``.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # the URL may hold a token

    webhook_url: SecretStr | None = None
    webhook_url_file: ConfigPath | None = None
    format: Literal["json", "slack"] = "json"
    stale_intervals: int = Field(default=DEFAULT_STALE_INTERVALS, ge=1, le=1000)
    min_interval_seconds: float = Field(default=60.0, ge=0)
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    ca_file: ConfigPath | None = None
    send_recovery: bool = True

    @model_validator(mode="after")
    def _one_webhook_source(self) -> AlertsConfig:
        if self.webhook_url is not None and self.webhook_url_file is not None:
            raise ValueError("set alerts.webhook_url or alerts.webhook_url_file, not both")
        if self.webhook_url is not None:
            check_webhook_url(self.webhook_url.get_secret_value(), "alerts.webhook_url")
        return self

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None or self.webhook_url_file is not None

    def resolved_url(self) -> str | None:
        """The webhook URL (a secret: never log it), read from ``webhook_url_file`` if set."""
        if self.webhook_url_file is not None:
            try:
                url = self.webhook_url_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"alerts.webhook_url_file: cannot read {str(self.webhook_url_file)!r}: "
                                  f"{exc.strerror}") from None
            try:
                check_webhook_url(url, "alerts.webhook_url_file")
            except ValueError as exc:
                raise ConfigError(f"{exc} (in {str(self.webhook_url_file)!r})") from None
            return url
        return self.webhook_url.get_secret_value() if self.webhook_url is not None else None


def check_webhook_url(url: str, key: str) -> None:
    # The message must not repeat the URL: it may carry a token.
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"{key}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key}: expected an http:// or https:// URL with a host")


def _read_secret_file(path: Path, key: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {str(path)!r}: {exc.strerror}") from None


class Config(BaseSettings):
    """The whole configuration. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="BACKUPD_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    kubelet: KubeletConfig = Field(default_factory=KubeletConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    backends: list[BackendConfig] = Field(default_factory=list)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Env overrides the file: the file arrives as init kwargs, so env must come first.
        return (env_settings, init_settings)

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, v: list[Any]) -> list[Any]:
        names = [b.name for b in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(dupes)}")
        return v

    def backend(self, name: str) -> FilesystemBackendConfig | S3BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        known = ", ".join(b.name for b in self.backends) or "none configured"
        raise ConfigError(f"unknown backend {name!r} (configured: {known})")


_SECRET_HINT = re.compile(r"secret|password|token|access_key|webhook|database\.url", re.IGNORECASE)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: the dotted key path, what is wrong, the value unless secret."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not _SECRET_HINT.search(path) and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {scrub(repr(err['input']))})"
        lines.append(f"{path}: {scrub(msg)}")
    return _problems(source, lines)


def _problems(source: str, lines: list[str]) -> str:
    return "\n".join([f"invalid configuration ({source}):", *(f"  {line}" for line in lines)])


def environment_problems(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with the ``BACKUPD_*`` variables before pydantic reads them: names that are
    no section and no :data:`NON_CONFIG_ENV`, and whole-section values that are not JSON. (Unknown
    keys of a known section, ``BACKUPD_DAEMON__BOGUS``, are pydantic's "unknown key".)"""
    sections = list(Config.model_fields)
    problems = []
    for name, value in sorted(environ.items()):
        upper = name.upper()  # the settings are read case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper in NON_CONFIG_ENV or upper.startswith(NON_CONFIG_ENV_PREFIX):
            continue
        rest = upper.removeprefix(ENV_PREFIX).lower()
        section, nested, _key = rest.partition("__")
        if section not in sections:
            near = next((s for s in sections if rest.startswith(f"{s}_")), None)
            hint = (f"did you mean {ENV_PREFIX}{near.upper()}__{rest.removeprefix(f'{near}_').upper()}?" if near
                    else f"no config section {section!r} (sections: {', '.join(sections)})")
            problems.append(f"{name}: unknown variable: {hint}")
        elif not nested:
            try:
                json.loads(value)
            except json.JSONDecodeError as exc:  # the value may hold a secret: say only where it breaks
                problems.append(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                                f"a whole section is given as JSON")
    return problems


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read ``path`` (or ``$BACKUPD_CONFIG``, or the default path if it exists) plus env overrides.

    Raises :class:`ConfigError` naming the key or variable for any invalid or unknown setting,
    and :data:`NO_CONFIG` when there is no file and the environment does not name a catalog.
    """
    explicit = path or os.environ.get("BACKUPD_CONFIG")
    file = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    source = f"{ENV_PREFIX}* environment"
    if problems := environment_problems(os.environ):
        raise ConfigError(_problems(source, problems))
    if file.exists():
        try:
            data = tomllib.loads(file.read_bytes().decode("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start} cannot be decoded); TOML files are UTF-8") \
                from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
        source = f"{file} and {source}"
    elif explicit:
        raise ConfigError(f"config file {str(file)!r} does not exist")
    elif not any(name.upper() in ("BACKUPD_DATABASE", "BACKUPD_DATABASE__URL") for name in os.environ):
        raise ConfigError(NO_CONFIG)
    try:
        return Config(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except SettingsError as exc:  # environment_problems() catches what this can be; kept for what it misses
        raise ConfigError(_problems(source, [str(exc)])) from None
