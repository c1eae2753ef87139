"""Configuration: a missing or malformed variable stops the process with one line naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from boxoffice import config
from tests.harness import ADMIN_TOKEN, CLIENT_TOKEN, STRIPE_KEY

GOOD = {
    "NATS_URL": "nats://127.0.0.1:4222",
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/boxoffice",
    "STRIPE_API_KEY": STRIPE_KEY,
    "STRIPE_WEBHOOK_SECRET": "whsec_aaaaaaaa,whsec_bbbbbbbb",
    "CLIENT_API_TOKENS": CLIENT_TOKEN,
    "ADMIN_API_TOKENS": ADMIN_TOKEN,
}


@pytest.mark.parametrize("service", ["ingress", "payment", "webhook", "error_sink", "reaper"])
def test_every_service_loads_a_good_environment(service: str) -> None:
    cfg = config.load(service, GOOD)
    assert cfg.service == service
    assert cfg.reservation_ttl_seconds == 900
    assert cfg.idempotency_key_ttl_hours == 24


@pytest.mark.parametrize("service", list(config.REQUIRED))
def test_each_required_variable_is_named_when_missing(service: str) -> None:
    for name in config.REQUIRED[service]:
        env = {k: v for k, v in GOOD.items() if k != name}
        with pytest.raises(config.ConfigError) as info:
            config.load(service, env)
        assert name in str(info.value)


@pytest.mark.parametrize("name,value", [
    ("DATABASE_URL", "nonsense"),
    ("DATABASE_URL", "mysql://x@y/z"),
    ("NATS_URL", "http://127.0.0.1:4222"),
    ("STRIPE_API_KEY", "pk_test_publishable"),
    ("RESERVATION_TTL_SECONDS", "0"),
    ("RESERVATION_TTL_SECONDS", "ten"),
    ("IDEMPOTENCY_KEY_TTL_HOURS", "-1"),
    ("HEALTH_PORT", "70000"),
    ("LOG_LEVEL", "LOUD"),
    ("STRIPE_API_BASE", "ftp://stripe"),
])
def test_malformed_values_are_named_and_not_echoed(name: str, value: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load("payment", {**GOOD, name: value})
    assert name in str(info.value)
    assert value not in str(info.value) or value in ("0",)


def test_ingress_rejects_short_tokens_and_shared_admin_tokens() -> None:
    with pytest.raises(config.ConfigError, match="CLIENT_API_TOKENS"):
        config.load("ingress", {**GOOD, "CLIENT_API_TOKENS": "short"})
    with pytest.raises(config.ConfigError, match="ADMIN_API_TOKENS"):
        config.load("ingress", {**GOOD, "ADMIN_API_TOKENS": CLIENT_TOKEN})


def test_ingress_never_needs_database_or_stripe_key() -> None:
    env = {k: v for k, v in GOOD.items() if k not in ("DATABASE_URL", "STRIPE_API_KEY")}
    cfg = config.load("ingress", env)
    assert cfg.database_url is None and cfg.stripe_api_key is None
    assert cfg.stripe_webhook_secrets == ("whsec_aaaaaaaa", "whsec_bbbbbbbb")


def test_repr_hides_secrets() -> None:
    cfg = config.load("payment", GOOD)
    assert STRIPE_KEY not in repr(cfg) and "postgresql" not in repr(cfg)


@pytest.mark.parametrize("service", ["payment", "webhook", "error_sink", "reaper"])
def test_process_with_nonsense_database_url_exits_with_one_line(service: str) -> None:
    env = {**GOOD, "DATABASE_URL": "nonsense", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "boxoffice.cli", "run", service], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "DATABASE_URL" in lines[0]
    assert "nonsense" not in lines[0]


def test_unknown_service_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "boxoffice.cli", "run", "billing"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "billing" in r.stderr


# --- BOXOFFICE_ENV=production refuses what is only fit for a developer's machine ------------

LIVE = {
    "NATS_URL": "nats://payment:s3cret-pass-0123456789@nats.internal:4222",
    "DATABASE_URL": "postgresql://boxoffice_payment:pg-s3cret-0123456789@db.internal:5432/boxoffice",
    "STRIPE_API_KEY": "sk_live_" + "a" * 24,
    "STRIPE_WEBHOOK_SECRET": "whsec_live_secret_0123456789",
    "CLIENT_API_TOKENS": "c" * 40,
    "ADMIN_API_TOKENS": "o" * 40,
    "BOXOFFICE_ENV": "production",
}


@pytest.mark.parametrize("service", ["ingress", "payment", "webhook", "error_sink", "reaper"])
def test_production_settings_load(service: str) -> None:
    assert config.load(service, LIVE).env == "production"


@pytest.mark.parametrize("service,name,value,says", [
    ("ingress", "CLIENT_API_TOKENS", "dev-client-token-change-me", "development default"),
    ("ingress", "ADMIN_API_TOKENS", "short-admin-token-0123", "at least 32"),
    ("ingress", "ADMIN_READ_API_TOKENS", "r" * 20, "at least 32"),
    ("payment", "DATABASE_URL",
     "postgresql://boxoffice:boxoffice-dev-password@postgres:5432/boxoffice", "development default"),
    ("payment", "STRIPE_API_BASE", "http://localstripe:8420", "emulator"),
    ("webhook", "STRIPE_API_KEY", "sk_test_" + "a" * 24, "test key"),
    ("reaper", "NATS_URL", "nats://nats.internal:4222", "anonymously"),
])
def test_production_refuses_development_settings(service: str, name: str, value: str,
                                                 says: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(service, dict(LIVE, **{name: value}))
    assert name in str(info.value) and says in str(info.value)
    assert value not in str(info.value)  # the value itself is never printed


def test_development_settings_are_fine_outside_production() -> None:
    assert config.load("payment", dict(LIVE, BOXOFFICE_ENV="development",
                                       STRIPE_API_KEY=STRIPE_KEY,
                                       STRIPE_API_BASE="http://localstripe:8420")).env == "development"


def test_production_refusal_is_one_line_and_exit_2() -> None:
    env = dict(LIVE, STRIPE_API_KEY="sk_test_" + "a" * 24)
    out = subprocess.run([sys.executable, "-m", "boxoffice.cli", "run", "payment"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "STRIPE_API_KEY" in out.stderr


def test_a_live_key_is_never_sent_to_an_emulator_in_any_environment() -> None:
    for env_name in ("development", "production"):
        env = dict(LIVE, BOXOFFICE_ENV=env_name, STRIPE_API_BASE="http://localstripe:8420")
        with pytest.raises(config.ConfigError) as info:
            config.load("payment", env)
        assert "STRIPE_API_BASE" in str(info.value) and "live key" in str(info.value)
    assert config.load("webhook", dict(LIVE, STRIPE_API_BASE="https://api.stripe.com")).env \
        == "production"
