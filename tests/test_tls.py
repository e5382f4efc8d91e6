"""HTTPS and mutual TLS end to end, with certificates this test makes: the server, the Python client,
`vae-score --url https://...` and the container health check."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL, Reference, digits_rows
from vaeclient import Client

pytestmark = pytest.mark.slow


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))


def make_ca(folder: Path, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(_name(stem)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(folder, stem, cert, key)
    return cert, key


def make_leaf(folder: Path, stem: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    """A certificate for 127.0.0.1 and localhost, good for a server and a client (no extended key usage)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca[0].subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False)
            .sign(ca[1], hashes.SHA256()))
    _write(folder, stem, cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    make_leaf(folder, "server", ca)
    make_leaf(folder, "client", ca)
    make_leaf(folder, "rogue", make_ca(folder, "rogue-ca"))
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    return root


def tls_env(pki: Path, mutual: bool) -> dict[str, str]:
    env = {"VAE_TLS_CERT": str(pki / "server.pem"), "VAE_TLS_KEY": str(pki / "server.key")}
    return {**env, "VAE_TLS_CLIENT_CA": str(pki / "ca.pem")} if mutual else env


def context(pki: Path, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.pem"), str(pki / f"{client}.key"))
    return ctx


@pytest.fixture(scope="module")
def https(pki, repo) -> Iterator[Server]:
    with Server(model_dir=repo, env=tls_env(pki, mutual=False), verify=context(pki), log=repo / "https.log") as s:
        yield s


@pytest.fixture(scope="module")
def mtls(pki, repo) -> Iterator[Server]:
    with Server(model_dir=repo, env=tls_env(pki, mutual=True), verify=context(pki, "client"),
                log=repo / "mtls.log") as s:
        yield s


def healthcheck(env: dict[str, str], port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.healthcheck"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "VAE_PORT": str(port), "VAE_HOST": "127.0.0.1"})


def test_https_serves_and_the_client_verifies_the_certificate(https, pki):
    assert https.url.startswith("https://")
    rows = digits_rows(3)
    with Client(https.url, ca=pki / "ca.pem") as vae:
        np.testing.assert_allclose(vae.encode(rows).mean, Reference().encode(rows)[0], atol=1e-4)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), Client(https.url, retries=0) as vae:
        vae.encode(rows)  # the system's CAs do not know this one: refused, never silently accepted
    with pytest.raises(httpx.TransportError):
        httpx.get(https.url.replace("https://", "http://") + "/health/live", timeout=5)
    assert healthcheck(tls_env(pki, mutual=False), https.port).returncode == 0


def test_mutual_tls_requires_a_certificate_from_the_client_ca(mtls, pki):
    rows = digits_rows(2)
    with Client(mtls.url, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key") as vae:
        assert vae.encode(rows).mean.shape == (2, 8)
    for who in (None, "rogue"):  # no certificate, or one from another CA: the handshake fails
        with pytest.raises(httpx.TransportError):
            httpx.get(mtls.url + "/health/live", verify=context(pki, who), timeout=5).raise_for_status()
    assert httpx.get(mtls.url + "/health/live", verify=context(pki, "client"), timeout=5).status_code == 200
    probe = healthcheck(tls_env(pki, mutual=True), mtls.port)
    assert probe.returncode == 0, probe.stderr


def test_vae_score_over_mutual_tls(mtls, pki, tmp_path):
    rows = digits_rows(5)
    np.save(tmp_path / "rows.npy", rows)
    out = tmp_path / "scores.csv"
    base = [sys.executable, "-m", "training.score", str(tmp_path / "rows.npy"), "--url", mtls.url, "-o", str(out),
            "--no-progress", "--ca", str(pki / "ca.pem")]
    done = subprocess.run([*base, "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == 6
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120)  # no client certificate
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert f"cannot reach {mtls.url}" in refused.stderr and "--cert" in refused.stderr


def test_tls_settings_must_come_together(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="VAE_TLS_CERT and VAE_TLS_KEY go together"):
        Settings(tls_cert=Path("c.pem"))
    with pytest.raises(ValidationError, match="VAE_TLS_CLIENT_CA asks clients"):
        Settings(tls_client_ca=Path("ca.pem"))


def test_grpc_serves_tls_and_mutual_tls_from_the_same_settings(https, mtls, pki):
    tg = pytest.importorskip("tritonclient.grpc")
    ca = str(pki / "ca.pem")

    def live(server: Server, **tls: object) -> bool:
        client = tg.InferenceServerClient(server.grpc_address, **tls)
        try:
            return bool(client.is_server_live(client_timeout=5))
        except tg.InferenceServerException:
            return False
        finally:
            client.close()

    assert live(https, ssl=True, root_certificates=ca)
    assert not live(https)  # plaintext against a TLS port
    assert live(mtls, ssl=True, root_certificates=ca, private_key=str(pki / "client.key"),
                certificate_chain=str(pki / "client.pem"))
    assert not live(mtls, ssl=True, root_certificates=ca)  # no client certificate: the handshake fails
    assert not live(mtls, ssl=True, root_certificates=ca, private_key=str(pki / "rogue.key"),
                    certificate_chain=str(pki / "rogue.pem"))
