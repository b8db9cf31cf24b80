"""The deployment's certificate and key files, read and checked before any process uses them.

A truncated `ca.crt`, a node key of the wrong kind or an expired certificate otherwise surfaces
late and disguised: Flower's SuperNode hangs with its port held, or a TLS failure is blamed on
the CA or the SANs. Each reader here parses the file with `cryptography` and raises one
FedcareError naming the file (``where``: the flag or settings key it came from), what is wrong
and what to do. Nothing here prints a file's content.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcare.errors import FedcareError

# What the coordinator runs when the SuperLink's certificates expire (same CA, SANs and node keys).
RENEW_COMMAND = "fedcare deploy renew DEPLOY_DIR"
RENEW_HINT = f"the coordinator renews it with `{RENEW_COMMAND}` and restarts the SuperLink"
NEW_CA_HINT = (
    "the coordinator makes a new deployment (`fedcare deploy init`), registers the new node keys and "
    "gives every hospital the new ca.crt"
)


def _when(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def require_in_date(
    certificate: x509.Certificate, what: str, expired_hint: str, now: dt.datetime | None = None
) -> None:
    """FedcareError if ``certificate`` (described as ``what``) has expired or is not valid yet at ``now``."""
    now = now or dt.datetime.now(dt.UTC)
    if certificate.not_valid_after_utc < now:
        raise FedcareError(f"{what} expired on {_when(certificate.not_valid_after_utc)}", expired_hint)
    if certificate.not_valid_before_utc > now:
        raise FedcareError(
            f"{what} is not valid before {_when(certificate.not_valid_before_utc)} (this machine's "
            f"clock says {_when(now)})",
            "check the clock of this machine and of the machine that issued the certificate "
            "(both should follow NTP), or wait until then",
        )


def read_certificates(path: Path, where: str, hint: str) -> list[x509.Certificate]:
    """Every certificate in the PEM file ``path``; FedcareError naming it if it is unreadable, empty or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FedcareError(f"{where}: cannot read {path}: {exc.strerror}", hint) from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise FedcareError(
            f"{where}: {path} is not a PEM certificate (corrupted, truncated or another kind of file)", hint
        )
    return certificates


def read_ca_certificates(path: Path, where: str, now: dt.datetime | None = None) -> list[x509.Certificate]:
    """The root(s) a node verifies the SuperLink with: PEM certificates, at least one a CA, every CA in date."""
    hint = "use the ca.crt the coordinator handed over (`fedcare deploy init` wrote it), copied unchanged"
    certificates = read_certificates(path, where, hint)
    authorities = [c for c in certificates if _is_ca(c)]
    if not authorities:
        raise FedcareError(f"{where}: {path} holds no CA certificate (is it the SuperLink's own certificate?)", hint)
    for certificate in authorities:
        try:
            require_in_date(certificate, f"the deployment's CA certificate {path}", NEW_CA_HINT, now)
        except FedcareError as exc:
            raise FedcareError(f"{where}: {exc.problem}", exc.hint) from None
    return authorities


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def read_node_key(path: Path, where: str) -> ec.EllipticCurvePrivateKey:
    """A SuperNode's authentication key: an unencrypted EC private key in OpenSSH format (what Flower 1.41 loads)."""
    hint = "use the node.key written by `fedcare deploy init` or `fedcare deploy node-key` (never the .pub)"
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise FedcareError(f"{where}: cannot read {path}: {exc.strerror}", hint) from None
    except (ValueError, TypeError):  # TypeError: encrypted with a passphrase
        raise FedcareError(
            f"{where}: {path} is not an OpenSSH private key (corrupted, encrypted or another kind of file)", hint
        ) from None
    except Exception:  # cryptography raises UnsupportedAlgorithm for exotic key types
        raise FedcareError(f"{where}: {path} is a key type this node cannot use", hint) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedcareError(
            f"{where}: {path} is an {type(key).__name__.lstrip('_')}, not an EC key (Flower's node "
            "authentication needs EC)",
            hint,
        )
    return key


def read_server_credentials(
    certificate: Path, key: Path, where: str, what: str, now: dt.datetime | None = None
) -> x509.Certificate:
    """A listener's certificate and key: both parse, they belong together, and the certificate is in date."""
    hint = "use the certificate and key `fedcare deploy init` (or `fedcare deploy renew`) wrote, as a pair"
    served = read_certificates(certificate, where, hint)[0]
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except OSError as exc:
        raise FedcareError(f"cannot read {key}: {exc.strerror}", hint) from None
    except (ValueError, TypeError):
        raise FedcareError(
            f"{key} is not a readable PEM private key (corrupted, encrypted or another kind of file)", hint
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != served.public_key().public_bytes(*spki):
        raise FedcareError(f"{key} is not the key of {certificate}", hint)
    try:
        require_in_date(served, what, RENEW_HINT, now)
    except FedcareError as exc:
        raise FedcareError(f"{where}: {exc.problem}", exc.hint) from None
    return served
