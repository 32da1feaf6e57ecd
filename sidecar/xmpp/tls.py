"""TLS for the transcriber's XMPP connection, with words for what goes wrong.

A stock Jitsi install has Prosody certificates that no public CA signed:
self-signed ones for ``<domain>`` and ``auth.<domain>`` (the Debian package
and docker-jitsi-meet make them). Three ways to trust the server:

- the system CAs (the default: a certificate from a public CA);
- ``xmpp.ca_file``: a PEM file, e.g. the Prosody certificate itself
  (``/etc/prosody/certs/<domain>.crt``); the chain and the name are checked;
- ``xmpp.pinned_cert_sha256``: the SHA-256 fingerprint of the server's
  certificate; the certificate must be that one, whoever signed it.

``xmpp.tls_server_name`` is the name the certificate must carry when it is
not the JID's domain (e.g. a certificate for ``auth.example.org`` on a
server reached for ``recorder.example.org``).

When verification fails, :func:`probe_certificate` fetches the server's
certificate over a separate STARTTLS handshake (no credentials are sent) so
that the error can name its subject and fingerprint and the option to set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

STREAMS = "http://etherx.jabber.org/streams"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"

_HEX = re.compile(r"[0-9a-f]{64}")


def normalise_fingerprint(value: str) -> str | None:
    """``AB:CD:...`` or ``abcd...`` (64 hex digits) as lower-case hex, or None."""
    text = value.strip().lower().replace(":", "").replace(" ", "")
    return text if _HEX.fullmatch(text) else None


def colon_hex(fp: str) -> str:
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def load_ca_file(path: Path) -> ssl.SSLContext:
    """A verifying context trusting ``path``; raises ValueError(reason)."""
    try:
        return ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except PermissionError:
        raise ValueError(f"{path} cannot be read (permission denied)") from None
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"{path} holds no PEM certificate ({e})") from None


@dataclass(frozen=True)
class TlsPolicy:
    ca_file: str = ""
    pinned_sha256: str = ""  # normalised, see normalise_fingerprint
    server_name: str = ""  # "" = the JID's domain

    def context(self) -> ssl.SSLContext:
        ctx = load_ca_file(Path(self.ca_file)) if self.ca_file else ssl.create_default_context()
        if self.pinned_sha256 and not self.ca_file:
            # the pin is the identity: no CA, no name to check
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.server_name or self.pinned_sha256:
            # slixmpp sends the JID's domain as the server name: the name is
            # checked after the handshake against server_name instead
            ctx.check_hostname = False
        return ctx

    def check(self, der: bytes, peercert: dict | None, domain: str) -> str | None:
        """What is wrong with the server's certificate after the handshake."""
        if self.pinned_sha256:
            got = fingerprint(der)
            if got != self.pinned_sha256:
                return (
                    f"the XMPP server's certificate (sha256 {colon_hex(got)}) is not the "
                    f"pinned one (xmpp.pinned_cert_sha256 = {colon_hex(self.pinned_sha256)})"
                )
            return None
        if self.server_name and peercert is not None:
            names = cert_names(peercert)
            if not any(name_matches(self.server_name, n) for n in names):
                return (
                    f"the XMPP server's certificate is for {', '.join(names) or '(no name)'}, "
                    f"not {self.server_name} (xmpp.tls_server_name)"
                )
        return None


def cert_names(peercert: dict) -> list[str]:
    names = [v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"]
    if names:
        return names
    for rdn in peercert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.append(v)
    return names


def name_matches(host: str, pattern: str) -> bool:
    """RFC 6125: exact, or a wildcard as the whole left-most label."""
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


async def probe_certificate(
    host: str, port: int, domain: str, limit_s: float = 5.0
) -> tuple[bytes, list[str]] | None:
    """The server's certificate (DER) and its names, fetched over STARTTLS
    without trusting it; None when that fails too."""
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                header = (
                    f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' "
                    f"xmlns='jabber:client' xmlns:stream='{STREAMS}'>"
                )
                writer.write(header.encode())
                await reader.readuntil(b"</stream:features>")
                writer.write(f"<starttls xmlns='{TLS_NS}'/>".encode())
                await reader.readuntil(b">")  # <proceed .../>
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                await writer.start_tls(ctx, server_hostname=domain)
                obj = writer.get_extra_info("ssl_object")
                der = obj.getpeercert(True) if obj is not None else None
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    if not der:
        return None
    return der, _names_of(der)


def _names_of(der: bytes) -> list[str]:
    """The DNS names of a certificate that was not verified (so Python's
    ``getpeercert()`` gives no dict): read with the cryptography package when
    it is there, else none."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:  # pragma: no cover - cryptography comes with the dependencies
        return []
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = list(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def explain(error: BaseException, domain: str, probed: tuple[bytes, list[str]] | None) -> str:
    """The start-up error for a failed verification, naming the option to set."""
    code = getattr(error, "verify_code", None)
    fp = colon_hex(fingerprint(probed[0])) if probed else ""
    names = ", ".join(probed[1]) if probed and probed[1] else ""
    about = f" (it names {names}; sha256 {fp})" if probed else ""
    crt = f"/etc/prosody/certs/{domain}.crt"
    pin_hint = (
        f' or xmpp.pinned_cert_sha256 = "{fp}" (check it on the server first: '
        f"openssl x509 -noout -fingerprint -sha256 -in {crt})"
        if fp
        else " or xmpp.pinned_cert_sha256 to its SHA-256 fingerprint"
    )
    if code in (18, 19):
        what = "is self-signed"
    elif code in (20, 21):
        what = "is signed by a CA this host does not trust"
    elif code == 10:
        what = "has expired"
    elif code == 62:
        return (
            f"the XMPP server's certificate is not for {domain}{about}: set "
            "xmpp.tls_server_name to a name it carries, or xmpp.pinned_cert_sha256"
            + (f' = "{fp}"' if fp else "")
        )
    else:
        what = f"could not be verified ({getattr(error, 'verify_message', '') or error})"
    return (
        f"the XMPP server's certificate for {domain} {what}{about}: set xmpp.ca_file to the "
        f"Prosody certificate (e.g. {crt}){pin_hint}"
    )
