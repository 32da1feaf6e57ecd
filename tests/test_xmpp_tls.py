"""TLS to a stock Prosody with a self-signed certificate.

Prosody 0.12 here requires STARTTLS (``c2s_require_encryption``, mod_tls) and
presents a self-signed certificate for the transcriber's domain made with
openssl, as the Debian package and docker-jitsi-meet make them. The sidecar:
refuses it at start-up with an error that names the problem and the option
to set (no silent retry loop), connects with ``xmpp.ca_file`` or with
``xmpp.pinned_cert_sha256``, and refuses a wrong pin.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sidecar.config import ConfigError, load_config
from sidecar.server import Sidecar
from tests.prosody import HIDDEN, Prosody, make_prosody
from tests.test_carriers import sidecar_env


def openssl_fingerprint(crt: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(crt)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().split("=", 1)[1]  # AB:CD:...


@pytest.fixture
def prosody(tmp_path):
    p = make_prosody(tmp_path, tls=True)
    p.crt = p.self_signed(HIDDEN)  # type: ignore[attr-defined]
    p.start()
    p.register("transcriber", HIDDEN, "tsecret")
    yield p
    p.stop()


def tls_env(tmp_path: Path, prosody: Prosody, **extra: str) -> dict[str, str]:
    env = sidecar_env(tmp_path, prosody, CAPTIONS_XMPP_STARTTLS="true")
    return env | extra


def reconnects() -> float:
    return REGISTRY.get_sample_value("captions_xmpp_reconnects_total") or 0.0


async def start_refused(env: dict[str, str]) -> str:
    sidecar = Sidecar(load_config(None, env=env))
    before = reconnects()
    t0 = time.monotonic()
    try:
        with pytest.raises(ConfigError) as info:
            await sidecar.start(preload=False)
        assert time.monotonic() - t0 < 9, "the refusal waited for the start timeout"
        await asyncio.sleep(2.5)
        assert reconnects() == before, "it went on retrying"
        assert sidecar.occupant is not None and not sidecar.occupant.online
    finally:
        await sidecar.stop()
    return str(info.value)


async def start_online(env: dict[str, str]) -> None:
    sidecar = Sidecar(load_config(None, env=env))
    try:
        await sidecar.start(preload=False)
        assert sidecar.occupant is not None and sidecar.occupant.online
        # it really is a TLS session
        assert sidecar.occupant.client.transport.get_extra_info("ssl_object") is not None
    finally:
        await sidecar.stop()


async def test_a_self_signed_certificate_is_refused_with_words_and_the_options(tmp_path, prosody):
    message = await start_refused(tls_env(tmp_path, prosody))
    fp = openssl_fingerprint(prosody.crt)
    assert f"the XMPP server's certificate for {HIDDEN} is self-signed" in message
    assert (
        f"set xmpp.ca_file to the Prosody certificate (e.g. /etc/prosody/certs/{HIDDEN}.crt)"
        in (message)
    )
    assert f'xmpp.pinned_cert_sha256 = "{fp}"' in message
    assert "tsecret" not in message


async def test_connected_with_the_ca_file(tmp_path, prosody):
    await start_online(tls_env(tmp_path, prosody, CAPTIONS_XMPP_CA_FILE=str(prosody.crt)))


async def test_connected_with_the_pin_in_either_spelling(tmp_path, prosody):
    fp = openssl_fingerprint(prosody.crt)
    await start_online(tls_env(tmp_path, prosody, CAPTIONS_XMPP_PINNED_CERT_SHA256=fp))
    plain = fp.replace(":", "").lower()
    await start_online(tls_env(tmp_path, prosody, CAPTIONS_XMPP_PINNED_CERT_SHA256=plain))


async def test_a_wrong_pin_is_refused(tmp_path, prosody):
    wrong = "ab" * 32
    message = await start_refused(
        tls_env(tmp_path, prosody, CAPTIONS_XMPP_PINNED_CERT_SHA256=wrong)
    )
    assert "is not the pinned one" in message
    assert openssl_fingerprint(prosody.crt) in message  # what it got instead


async def test_a_certificate_for_another_name_is_refused(tmp_path, prosody):
    message = await start_refused(
        tls_env(
            tmp_path,
            prosody,
            CAPTIONS_XMPP_CA_FILE=str(prosody.crt),
            CAPTIONS_XMPP_TLS_SERVER_NAME="auth.example.org",
        )
    )
    assert f"is for {HIDDEN}, not auth.example.org (xmpp.tls_server_name)" in message


def test_tls_options_are_checked_when_the_configuration_is_read(tmp_path):
    base = {"CAPTIONS_SERVER_TOKEN": "t"}
    with pytest.raises(ConfigError, match=r"xmpp\.ca_file: .*missing\.crt does not exist"):
        load_config(None, env=base | {"CAPTIONS_XMPP_CA_FILE": str(tmp_path / "missing.crt")})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"xmpp\.ca_file: .*holds no PEM certificate"):
        load_config(None, env=base | {"CAPTIONS_XMPP_CA_FILE": str(junk)})
    with pytest.raises(ConfigError, match=r"xmpp\.pinned_cert_sha256: .*64 hex digits"):
        load_config(None, env=base | {"CAPTIONS_XMPP_PINNED_CERT_SHA256": "abcd"})
    with pytest.raises(ConfigError, match=r"needs xmpp\.starttls = true"):
        load_config(
            None,
            env=base
            | {"CAPTIONS_XMPP_STARTTLS": "false", "CAPTIONS_XMPP_PINNED_CERT_SHA256": "ab" * 32},
        )
