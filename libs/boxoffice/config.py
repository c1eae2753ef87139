"""Typed configuration, read once from the environment into a frozen object.

A missing or malformed variable stops the process with one line naming it
(``ConfigError``); values of secret variables are never printed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from boxoffice.errors import BoxofficeError

# Variables each service needs: the container stack and `boxoffice up` pass exactly these
# (tests/test_compose.py checks docker-compose.yml against this table).
REQUIRED: dict[str, tuple[str, ...]] = {
    "ingress": ("NATS_URL", "STRIPE_WEBHOOK_SECRET", "CLIENT_API_TOKENS", "ADMIN_API_TOKENS"),
    "payment": ("NATS_URL", "DATABASE_URL", "STRIPE_API_KEY"),
    "webhook": ("NATS_URL", "DATABASE_URL", "STRIPE_API_KEY"),
    "error_sink": ("NATS_URL", "DATABASE_URL"),
    "reaper": ("NATS_URL", "DATABASE_URL"),
}
# Variables each service reads when set.
OPTIONAL: dict[str, tuple[str, ...]] = {
    "ingress": ("INGRESS_PORT", "INGRESS_REUSE_PORT", "HEALTH_PORT", "SENTRY_INGEST_KEYS", "MAX_BODY_BYTES",
                "ERROR_RATE_LIMIT_PER_MINUTE", "ADMIN_READ_API_TOKENS", "SENTRY_PROJECTS",
                "SENTRY_FEEDBACK_EMAIL"),
    "payment": ("HEALTH_PORT", "STRIPE_API_BASE", "RESERVATION_TTL_SECONDS",
                "IDEMPOTENCY_KEY_TTL_HOURS"),
    "webhook": ("HEALTH_PORT", "STRIPE_API_BASE", "WEBHOOK_RETRY_DELAYS", "WEBHOOK_BATCH_SIZE",
                "STRIPE_RECONCILE_INTERVAL_SECONDS", "STRIPE_RECONCILE_GRACE_SECONDS",
                "AUDIT_INTERVAL_SECONDS", "AUDIT_GRACE_SECONDS"),
    "error_sink": ("HEALTH_PORT", "ALERT_WEBHOOK_URL", "ALERT_WEBHOOK_SECRET", "ALERT_RATE_PER_MINUTE",
                   "ALERT_WINDOW_SECONDS"),
    "reaper": ("HEALTH_PORT", "IDEMPOTENCY_KEY_TTL_HOURS", "WEBHOOK_LOG_RETENTION_DAYS",
               "ERROR_RETENTION_DAYS", "REAPER_SWEEP_SECONDS", "REAPER_BATCH_SIZE",
               "REAPER_RETENTION_INTERVAL_SECONDS", "AUDIT_INTERVAL_SECONDS", "AUDIT_GRACE_SECONDS"),
}
COMMON_OPTIONAL = ("SENTRY_DSN", "BOXOFFICE_ENV", "LOG_LEVEL", "BOXOFFICE_RELEASE", "ERROR_SPOOL_DIR",
                   "NATS_CA_FILE", "NATS_STREAM_REPLICAS")
SECRET = frozenset({"DATABASE_URL", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET",
                    "CLIENT_API_TOKENS", "ADMIN_API_TOKENS", "SENTRY_DSN", "NATS_URL",
                    "ALERT_WEBHOOK_URL", "ALERT_WEBHOOK_SECRET", "ADMIN_READ_API_TOKENS"})

# ingress's health port serves /metrics off the public listener (INGRESS_PORT)
DEFAULT_HEALTH_PORTS = {"ingress": 8085, "payment": 8081, "webhook": 8082,
                        "error_sink": 8083, "reaper": 8084}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(BoxofficeError):
    """A variable is missing or malformed; the message names it and never shows its value."""

    code = "config_error"

    def __init__(self, name: str, reason: str):
        super().__init__(f"configuration error: {name} {reason}")
        self.name = name


@dataclasses.dataclass(frozen=True, repr=False)
class Config:
    service: str
    nats_url: str = "nats://127.0.0.1:4222"
    nats_ca_file: str | None = None  # the CA that signed nats-server's certificate (tls://)
    # copies of each JetStream stream the service declares: 3 on a cluster of three nodes
    nats_stream_replicas: int = 1
    database_url: str | None = None
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secrets: tuple[str, ...] = ()
    client_api_tokens: tuple[str, ...] = ()
    admin_api_tokens: tuple[str, ...] = ()       # scope "operate": read and act
    admin_read_api_tokens: tuple[str, ...] = ()  # scope "read": lists and stats only
    sentry_dsn: str | None = None
    sentry_ingest_keys: tuple[str, ...] = ()
    # ingress: a Sentry DSN's project id -> the service its events are stored under
    sentry_projects: tuple[tuple[str, str], ...] = ()
    sentry_feedback_email: str = "keep"  # or "filter": feedback's e-mail stored as [Filtered]
    env: str = "development"
    release: str | None = None
    log_level: str = "INFO"
    ingress_port: int = 8080
    # ingress: several processes may listen on INGRESS_PORT (SO_REUSEPORT; Linux balances
    # connections between them); off by default, so a second stack on a taken port is refused
    ingress_reuse_port: bool = False
    health_port: int = 8080
    max_body_bytes: int = 1 << 20
    reservation_ttl_seconds: int = 900
    idempotency_key_ttl_hours: int = 24
    webhook_log_retention_days: int = 30
    error_retention_days: int = 90
    alert_webhook_url: str | None = None
    alert_webhook_secret: str | None = None
    alert_rate_per_minute: int = 100
    alert_window_seconds: int = 300
    error_rate_limit_per_minute: int = 6000
    error_spool_dir: str | None = None
    # reaper: catch-up sweep period (wake-ups come from NOTIFY), holds per transaction,
    # seconds between retention purges
    reaper_sweep_seconds: int = 1
    # reaper: the longest a hold written without a wake-up waits to be armed
    reaper_arm_seconds: int = 1
    # 5000: every batch's claim steps over the index entries of the holds earlier batches
    # expired (until no open snapshot can see them), and every batch pays its round trips and
    # its commit; 100,000 holds due at once took about 15% less PostgreSQL CPU each than in
    # batches of 2000, and a batch still holds its rows' locks for tens of milliseconds
    reaper_batch_size: int = 5000
    reaper_retention_interval_seconds: int = 600
    # seconds between attempts to apply a failing Stripe event; attempts = len + 1
    webhook_retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
    # webhook: Stripe events applied in one transaction (each in a savepoint of its own); a
    # batch holds the inventory buckets of its holds until its commit
    webhook_batch_size: int = 128
    # webhook: seconds between reconciliations with Stripe, and how old an event, a payment or a
    # PaymentIntent must be before reconciliation looks at it (younger ones are webhooks and
    # checkouts still in flight)
    stripe_reconcile_interval_seconds: int = 300
    stripe_reconcile_grace_seconds: int = 300
    # reaper and webhook: seconds between runs of the self-audit, and how long a difference that
    # work in flight explains (a webhook on its way, a refund being made) is given to settle
    audit_interval_seconds: int = 300
    audit_grace_seconds: int = 900

    def __repr__(self) -> str:  # never print secrets
        return f"Config(service={self.service!r}, env={self.env!r})"


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(raw)
        host_ok = bool(parts.hostname) or "host=" in parts.query
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise ConfigError(name, "is not a valid URL") from None
    if parts.scheme not in schemes or not host_ok:
        raise ConfigError(name, f"must be a URL with scheme {' or '.join(schemes)} and a host")
    return raw


def _pg_url(name: str, raw: str) -> str:
    """A PostgreSQL URL, with one server or several (``postgresql://u:p@h1:5432,h2:5432/db``,
    a primary and its standby: with ``target_session_attrs=read-write`` the client takes
    whichever is the primary)."""
    parts = urlsplit(raw)
    servers = parts.netloc.rpartition("@")[2].split(",")
    if len(servers) > 1:
        for one in servers:
            try:
                if not urlsplit(f"//{one}").hostname:
                    raise ValueError
                urlsplit(f"//{one}").port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise ConfigError(name, "is not a valid URL (a server of its list is not "
                                        "host:port)") from None
        raw_first = urlunsplit(parts._replace(netloc=servers[0]))
        _url(name, raw_first, ("postgres", "postgresql"))
        return raw
    return _url(name, raw, ("postgres", "postgresql"))


def _nats_urls(raw: str) -> str:
    """NATS_URL: comma-separated servers; one given as ``host:port`` after a whole URL takes
    that URL's scheme, user and password (``nats://u:p@nats-1:4222,nats-2:4222,nats-3:4222``)."""
    out: list[str] = []
    for one in (u.strip() for u in raw.split(",")):
        if out and "://" not in one:
            first = urlsplit(out[0])
            user = first.netloc.rpartition("@")[0]
            one = f"{first.scheme}://{user + '@' if user else ''}{one}"
        out.append(_url("NATS_URL", one, ("nats", "tls", "ws", "wss")))
    return ",".join(out)


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"\d+", raw.strip()):
        raise ConfigError(name, f"must be an integer between {lo} and {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be an integer between {lo} and {hi}")
    return value


def _list(name: str, raw: str, min_len: int = 1) -> tuple[str, ...]:
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise ConfigError(name, "must list at least one value (comma-separated)")
    if any(len(i) < min_len or not i.isprintable() or " " in i for i in items):
        raise ConfigError(name, f"values must be printable, without spaces, at least {min_len} characters")
    return items


def _delays(name: str, raw: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(p) for p in raw.split(","))
    except ValueError:
        raise ConfigError(name, "must be comma-separated seconds, such as 1,5,30") from None
    if not 1 <= len(delays) <= 50 or any(not 0 <= d <= 86400 for d in delays):
        raise ConfigError(name, "must list 1 to 50 delays, each 0 to 86400 seconds")
    return delays


def _projects(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in raw.split(","):
        pid, _, name = part.strip().partition("=")
        if not re.fullmatch(r"\d{1,18}", pid.strip()) \
                or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name.strip()):
            raise ConfigError("SENTRY_PROJECTS", "must list <project id>=<service>, "
                                                 "such as 1=shop-web,2=box-office-app")
        pairs.append((str(int(pid)), name.strip()))
    return tuple(pairs)


def load(service: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration of ``service`` from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    if service not in REQUIRED:
        raise ConfigError("service", f"must be one of {', '.join(REQUIRED)}")
    for name in REQUIRED[service]:
        if not env.get(name, "").strip():
            raise ConfigError(name, "is required but not set")

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    kw: dict[str, object] = {"service": service}
    if v := get("NATS_URL"):
        kw["nats_url"] = _nats_urls(v)
    if v := get("NATS_CA_FILE"):
        if not os.access(v, os.R_OK) or not os.path.isfile(v):
            raise ConfigError("NATS_CA_FILE", "must name a readable file (PEM certificates)")
        kw["nats_ca_file"] = v
    if v := get("NATS_STREAM_REPLICAS"):
        kw["nats_stream_replicas"] = _int("NATS_STREAM_REPLICAS", v, 1, 5)  # JetStream's limit
    if service != "ingress" and (v := get("DATABASE_URL")):
        kw["database_url"] = _pg_url("DATABASE_URL", v)
    if service in ("payment", "webhook"):
        if v := get("STRIPE_API_KEY"):
            if not re.fullmatch(r"(sk|rk)_(test|live)_[A-Za-z0-9_]+", v):
                raise ConfigError("STRIPE_API_KEY", "must look like sk_test_... or sk_live_...")
            kw["stripe_api_key"] = v
        if v := get("STRIPE_API_BASE"):
            kw["stripe_api_base"] = _url("STRIPE_API_BASE", v.rstrip("/"), ("http", "https"))
            live = str(kw.get("stripe_api_key", "")).startswith(("sk_live_", "rk_live_"))
            if live and urlsplit(v).hostname != "api.stripe.com":
                # in any environment: a live key is never sent to an emulator (or anyone else)
                raise ConfigError("STRIPE_API_BASE", "points at a Stripe emulator, not "
                                                     "api.stripe.com, and STRIPE_API_KEY is a "
                                                     "live key: unset one of them")
    if service == "ingress":
        kw["stripe_webhook_secrets"] = _list("STRIPE_WEBHOOK_SECRET", env["STRIPE_WEBHOOK_SECRET"], 8)
        clients = kw["client_api_tokens"] = _list("CLIENT_API_TOKENS", env["CLIENT_API_TOKENS"], 16)
        admins = kw["admin_api_tokens"] = _list("ADMIN_API_TOKENS", env["ADMIN_API_TOKENS"], 16)
        if set(clients) & set(admins):
            raise ConfigError("ADMIN_API_TOKENS", "must not share a token with CLIENT_API_TOKENS")
        if v := get("ADMIN_READ_API_TOKENS"):
            readers = kw["admin_read_api_tokens"] = _list("ADMIN_READ_API_TOKENS", v, 16)
            if set(readers) & (set(clients) | set(admins)):
                raise ConfigError("ADMIN_READ_API_TOKENS",
                                  "must not share a token with CLIENT_API_TOKENS or ADMIN_API_TOKENS")
        if v := get("SENTRY_INGEST_KEYS"):
            kw["sentry_ingest_keys"] = _list("SENTRY_INGEST_KEYS", v, 8)
        if v := get("SENTRY_PROJECTS"):
            kw["sentry_projects"] = _projects(v)
        if v := get("SENTRY_FEEDBACK_EMAIL"):
            if v not in ("keep", "filter"):
                raise ConfigError("SENTRY_FEEDBACK_EMAIL", "must be keep or filter")
            kw["sentry_feedback_email"] = v
        if v := get("INGRESS_PORT"):
            kw["ingress_port"] = _int("INGRESS_PORT", v, 0, 65535)
        if v := get("INGRESS_REUSE_PORT"):
            if v not in ("0", "1"):
                raise ConfigError("INGRESS_REUSE_PORT", "must be 0 or 1")
            kw["ingress_reuse_port"] = v == "1"
        kw["health_port"] = DEFAULT_HEALTH_PORTS[service]
        if v := get("HEALTH_PORT"):
            kw["health_port"] = _int("HEALTH_PORT", v, 0, 65535)
        if v := get("MAX_BODY_BYTES"):
            kw["max_body_bytes"] = _int("MAX_BODY_BYTES", v, 1024, 256 << 20)
    else:
        kw["health_port"] = DEFAULT_HEALTH_PORTS[service]
        if v := get("HEALTH_PORT"):
            kw["health_port"] = _int("HEALTH_PORT", v, 0, 65535)
    if v := get("SENTRY_DSN"):
        kw["sentry_dsn"] = _url("SENTRY_DSN", v, ("http", "https"))
    if v := get("BOXOFFICE_ENV"):
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", v):
            raise ConfigError("BOXOFFICE_ENV", "must be a short lowercase name such as production")
        kw["env"] = v
    if v := get("BOXOFFICE_RELEASE"):
        kw["release"] = v[:64]
    if v := get("LOG_LEVEL"):
        if v.upper() not in LOG_LEVELS:
            raise ConfigError("LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}")
        kw["log_level"] = v.upper()
    if v := get("RESERVATION_TTL_SECONDS"):
        kw["reservation_ttl_seconds"] = _int("RESERVATION_TTL_SECONDS", v, 1, 7 * 86400)
    if v := get("IDEMPOTENCY_KEY_TTL_HOURS"):
        kw["idempotency_key_ttl_hours"] = _int("IDEMPOTENCY_KEY_TTL_HOURS", v, 1, 24 * 365)
    if v := get("WEBHOOK_LOG_RETENTION_DAYS"):
        kw["webhook_log_retention_days"] = _int("WEBHOOK_LOG_RETENTION_DAYS", v, 1, 3650)
    if v := get("ERROR_RETENTION_DAYS"):
        kw["error_retention_days"] = _int("ERROR_RETENTION_DAYS", v, 1, 3650)
    if v := get("ALERT_WEBHOOK_URL"):
        kw["alert_webhook_url"] = _url("ALERT_WEBHOOK_URL", v, ("http", "https"))
    if v := get("ALERT_WEBHOOK_SECRET"):
        if not re.fullmatch(r"(whsec_)?[A-Za-z0-9+/]{24,}={0,2}", v):
            raise ConfigError("ALERT_WEBHOOK_SECRET",
                              "must be whsec_ followed by at least 18 bytes in base64")
        kw["alert_webhook_secret"] = v
    if v := get("ALERT_RATE_PER_MINUTE"):
        kw["alert_rate_per_minute"] = _int("ALERT_RATE_PER_MINUTE", v, 1, 10_000_000)
    if v := get("ALERT_WINDOW_SECONDS"):
        kw["alert_window_seconds"] = _int("ALERT_WINDOW_SECONDS", v, 1, 7 * 86400)
    if v := get("ERROR_RATE_LIMIT_PER_MINUTE"):
        kw["error_rate_limit_per_minute"] = _int("ERROR_RATE_LIMIT_PER_MINUTE", v, 1, 100_000_000)
    if v := get("ERROR_SPOOL_DIR"):
        kw["error_spool_dir"] = v
    if v := get("WEBHOOK_RETRY_DELAYS"):
        kw["webhook_retry_delays"] = _delays("WEBHOOK_RETRY_DELAYS", v)
    if v := get("WEBHOOK_BATCH_SIZE"):
        kw["webhook_batch_size"] = _int("WEBHOOK_BATCH_SIZE", v, 1, 1000)
    if v := get("STRIPE_RECONCILE_INTERVAL_SECONDS"):
        kw["stripe_reconcile_interval_seconds"] = _int("STRIPE_RECONCILE_INTERVAL_SECONDS", v,
                                                       1, 86400)
    if v := get("STRIPE_RECONCILE_GRACE_SECONDS"):
        kw["stripe_reconcile_grace_seconds"] = _int("STRIPE_RECONCILE_GRACE_SECONDS", v, 0, 86400)
    if v := get("AUDIT_INTERVAL_SECONDS"):
        kw["audit_interval_seconds"] = _int("AUDIT_INTERVAL_SECONDS", v, 1, 7 * 86400)
    if v := get("AUDIT_GRACE_SECONDS"):
        kw["audit_grace_seconds"] = _int("AUDIT_GRACE_SECONDS", v, 0, 7 * 86400)
    if v := get("REAPER_SWEEP_SECONDS"):
        kw["reaper_sweep_seconds"] = _int("REAPER_SWEEP_SECONDS", v, 1, 3600)
    if v := get("REAPER_ARM_SECONDS"):
        kw["reaper_arm_seconds"] = _int("REAPER_ARM_SECONDS", v, 1, 3600)
    if v := get("REAPER_BATCH_SIZE"):
        kw["reaper_batch_size"] = _int("REAPER_BATCH_SIZE", v, 1, 50000)
    if v := get("REAPER_RETENTION_INTERVAL_SECONDS"):
        kw["reaper_retention_interval_seconds"] = _int("REAPER_RETENTION_INTERVAL_SECONDS", v,
                                                       1, 7 * 86400)
    cfg = Config(**kw)  # type: ignore[arg-type]
    if cfg.env == "production":
        refuse_development_settings(cfg, env)
    return cfg


# The development defaults of docker-compose.yml and of the tests: never in production.
DEVELOPMENT_SECRETS = frozenset({
    "dev-client-token-change-me", "dev-admin-token-change-me", "boxoffice-dev-password",
    "whsec_boxoffice_dev_secret", "0123456789abcdef0123456789abcdef", "sk_test_boxoffice_dev",
})
MIN_PRODUCTION_TOKEN = 32


def _secrets_in(value: str) -> list[str]:
    """A setting's secret parts: list items, and a URL's password."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    for p in list(parts):
        if "://" in p:
            with_password = urlsplit(p).password
            if with_password:
                parts.append(with_password)
    return parts


def refuse_development_settings(cfg: Config, env: Mapping[str, str]) -> None:
    """With ``BOXOFFICE_ENV=production``, refuse what is only fit for a developer's machine."""
    for name in sorted(SECRET):
        for part in _secrets_in(env.get(name, "")):
            if part in DEVELOPMENT_SECRETS or "change-me" in part:
                raise ConfigError(name, "holds a development default; set a secret of your own")
    for name, tokens in (("CLIENT_API_TOKENS", cfg.client_api_tokens),
                         ("ADMIN_API_TOKENS", cfg.admin_api_tokens),
                         ("ADMIN_READ_API_TOKENS", cfg.admin_read_api_tokens)):
        if any(len(t) < MIN_PRODUCTION_TOKEN for t in tokens):
            raise ConfigError(name, f"needs tokens of at least {MIN_PRODUCTION_TOKEN} characters "
                                    "in production")
    if cfg.stripe_api_base and urlsplit(cfg.stripe_api_base).hostname != "api.stripe.com":
        raise ConfigError("STRIPE_API_BASE", "points at a Stripe emulator; unset it in production")
    if cfg.stripe_api_key and cfg.stripe_api_key.startswith(("sk_test_", "rk_test_")):
        raise ConfigError("STRIPE_API_KEY", "is a test key; production needs a live key")
    if not all(urlsplit(u).username for u in cfg.nats_url.split(",")):
        raise ConfigError("NATS_URL", "connects anonymously; production needs the service's "
                                      "user and password in it")
