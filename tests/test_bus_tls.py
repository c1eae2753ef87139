"""NATS over TLS: a ``tls://`` URL with ``NATS_CA_FILE`` verifies nats-server's certificate
against that CA (a test CA made by trustme); a certificate it did not sign is refused at once."""

from __future__ import annotations

import uuid
from pathlib import Path

import aiohttp
import pytest
import trustme

from boxoffice import bus as busmod
from boxoffice import config, errors
from boxoffice.embedded import NatsServer
from tests.harness import CLIENT_TOKEN, NATS_PASSWORDS, ServiceProcess, base_env


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return tmp_path / "ca.pem"


@pytest.fixture
def tls_server(tmp_path: Path, ca_file: Path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(ca_file))
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    server = NatsServer(tmp_path / "nats", sync_always=False, passwords=NATS_PASSWORDS,
                        tls=(cert, key)).start()
    try:
        yield server
    finally:
        server.kill()


async def test_tls_url_with_the_ca_verifies_and_carries_the_bus(tls_server, ca_file) -> None:
    url = tls_server.url_for("payment")
    assert url.startswith("tls://payment:")
    async with busmod.connect(tls_server.url, "operator", ca_file=str(ca_file)) as op:
        await op.declare_streams("ERRORS")
        assert op.nc.connected_url is not None and op.nc.connected_url.scheme == "tls"
    async with busmod.connect(url, "payment", ca_file=str(ca_file)) as bus:
        assert await bus.publish("errors.payment.error", b"{}", str(uuid.uuid4()))


async def test_a_certificate_the_ca_did_not_sign_is_refused(tls_server, tmp_path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    for ca in (str(other), None):  # another CA, and the system's CAs
        with pytest.raises(errors.ServiceUnavailable) as refused:
            async with busmod.connect(tls_server.url_for("payment"), "payment", ca_file=ca):
                pass
        assert "NATS_CA_FILE" in refused.value.detail
        assert NATS_PASSWORDS["payment"] not in refused.value.detail


async def test_a_service_runs_over_tls_with_nats_ca_file(tls_server, ca_file, tmp_path) -> None:
    env = base_env(tls_server.url, "postgresql://unused@127.0.0.1/unused")
    ingress = ServiceProcess("ingress", env, tmp_path / "ingress.log")
    ingress.start(NATS_CA_FILE=str(ca_file))  # ready: connected, its streams declared
    try:
        report = {"id": str(uuid.uuid4()), "occurred_at": "2026-11-28T12:00:00Z",
                  "service": "shop-web", "level": "error", "message": "over TLS"}
        async with aiohttp.ClientSession() as s, s.post(f"{ingress.url}/v1/errors", json=report,
                          headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as r:
            assert r.status == 202, await r.text()  # acknowledged by JetStream, over TLS
    finally:
        assert ingress.stop() == 0


def test_nats_ca_file_must_be_a_readable_file(tmp_path, ca_file) -> None:
    env = {"NATS_URL": "tls://payment:pw@127.0.0.1:4222", "DATABASE_URL": "postgresql://x@h/db",
           "STRIPE_API_KEY": "sk_test_x"}
    with pytest.raises(config.ConfigError) as bad:
        config.load("payment", dict(env, NATS_CA_FILE=str(tmp_path / "missing.pem")))
    assert bad.value.name == "NATS_CA_FILE"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    assert config.load("payment", dict(env, NATS_CA_FILE=str(ca_file))).nats_ca_file == str(ca_file)
