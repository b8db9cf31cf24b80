"""Can this node reach its SuperLink, and does the SuperLink's certificate hold? Asked before the node starts.

Flower 1.41's SuperNode retries an unreachable SuperLink forever without naming the address, and
reports every certificate problem as one "SSL/TLS handshake error". `probe_superlink` opens a TCP
connection to the address the node dials and completes a TLS handshake verified exactly as the
node verifies it (the node's `ca.crt`, the host it dials); then closes. Each failure is one
FedcareError naming the address and the cause: nothing listening (`SuperLinkUnreachable`, the
one worth waiting for), no TLS on that port, a certificate that expired or is not valid yet (read
from the served certificate, with its date), one from another CA, or one that does not name the
host. `wait_for_superlink` retries only the unreachable case, for a bounded time, naming the
address on every attempt.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from fedcare.deploy_pki import split_address
from fedcare.errors import FedcareError
from fedcare.tls_files import RENEW_HINT, require_in_date

CONNECT_TIMEOUT_S = 5.0  # one TCP connect + TLS handshake attempt
RETRY_S = 5.0  # pause between attempts while waiting for an unreachable SuperLink
UNREACHABLE_HINT = (
    "is the SuperLink running (ask the coordinator), and is [superlink] address in hospital.toml "
    "its public HOST:PORT? a firewall between this machine and the SuperLink must let it through"
)
# OpenSSL verification results the served certificate's names explain (X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH).
_NAME_MISMATCH = {62, 64}
# OpenSSL's reasons when the other end answers in something other than TLS (plain HTTP, another protocol).
_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
    "UNKNOWN_PROTOCOL",
}


class SuperLinkUnreachable(FedcareError):
    """Nothing answered at the SuperLink's address (refused, timed out, unresolvable): it may come back."""


def probe_superlink(
    address: str, root_certificates: Path, timeout_s: float = CONNECT_TIMEOUT_S, now: dt.datetime | None = None
) -> None:
    """Connect to ``address`` and verify its TLS certificate against ``root_certificates``, as the node will.

    Returns when the handshake succeeds; raises `SuperLinkUnreachable` when nothing answers, and a
    FedcareError naming the cause when something answers but the node could not connect to it.
    """
    host, port = split_address(address)
    where = f"the SuperLink at {address}"
    try:
        context = ssl.create_default_context(cafile=str(root_certificates))
    except (ssl.SSLError, OSError) as exc:
        raise FedcareError(
            f"cannot load {root_certificates} as the SuperLink's CA ({exc})",
            "use the ca.crt the coordinator handed over, copied unchanged",
        ) from None
    try:
        with _connect(host, port, where, timeout_s) as raw, context.wrap_socket(raw, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        raise _certificate_problem(exc, host, port, address, root_certificates, timeout_s, now) from None
    except ssl.SSLError as exc:
        if exc.reason in _NOT_TLS:
            raise FedcareError(
                f"{address} answers but does not speak TLS ({exc.reason})",
                "set [superlink] address to the SuperLink's public port (the one `fedcare deploy "
                "init` was given with --address)",
            ) from None
        raise FedcareError(
            f"the TLS handshake with {where} failed ({exc.reason or exc})",
            "check that [superlink] address is the SuperLink's public port, and tell the coordinator this reason",
        ) from None
    except (ConnectionError, TimeoutError) as exc:  # accepted, then dropped during the handshake
        raise SuperLinkUnreachable(
            f"cannot reach {where} (the connection closed during the TLS handshake: "
            f"{exc.strerror or type(exc).__name__})",
            UNREACHABLE_HINT,
        ) from None


def _connect(host: str, port: int, where: str, timeout_s: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        raise SuperLinkUnreachable(
            f"cannot reach {where} (cannot resolve '{host}': {exc.strerror})", UNREACHABLE_HINT
        ) from None
    except ConnectionRefusedError:
        raise SuperLinkUnreachable(f"cannot reach {where} (connection refused)", UNREACHABLE_HINT) from None
    except TimeoutError:
        raise SuperLinkUnreachable(
            f"cannot reach {where} (no answer within {timeout_s:g} s)", UNREACHABLE_HINT
        ) from None
    except OSError as exc:
        raise SuperLinkUnreachable(f"cannot reach {where} ({exc.strerror or exc})", UNREACHABLE_HINT) from None


def _served_certificate(host: str, port: int, where: str, timeout_s: float) -> x509.Certificate | None:
    """The certificate the SuperLink serves, fetched without verifying it (only to explain a failure)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with _connect(host, port, where, timeout_s) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, FedcareError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _certificate_problem(
    exc: ssl.SSLCertVerificationError,
    host: str,
    port: int,
    address: str,
    root_certificates: Path,
    timeout_s: float,
    now: dt.datetime | None,
) -> FedcareError:
    """Why the node would refuse the SuperLink's certificate, read from the certificate itself."""
    served = _served_certificate(host, port, f"the SuperLink at {address}", timeout_s)
    if served is not None:
        try:
            require_in_date(served, "the SuperLink's certificate", RENEW_HINT, now)
        except FedcareError as dated:
            return FedcareError(f"{address}: {dated.problem}", dated.hint)
    if exc.verify_code in _NAME_MISMATCH:
        names = _names(served) if served is not None else "?"
        return FedcareError(
            f"the SuperLink's certificate at {address} does not name {host} (it names {names})",
            "set [superlink] address to one of those names, or the coordinator reissues the "
            f"certificate with `fedcare deploy init --san {host}`",
        )
    return FedcareError(
        f"the SuperLink's certificate at {address} is not signed by the CA in {root_certificates} "
        f"({exc.verify_message})",
        "use the ca.crt of this deployment (the coordinator's `fedcare deploy init` wrote it), and "
        "check that [superlink] address is this deployment's SuperLink",
    )


def _names(certificate: x509.Certificate) -> str:
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative names"
    return ", ".join(str(name.value) for name in sans) or "no names"


def wait_for_superlink(
    address: str, root_certificates: Path, wait_s: float, say: Callable[[str], None], retry_s: float = RETRY_S
) -> None:
    """`probe_superlink`, retried every ``retry_s`` while nothing answers, for at most ``wait_s`` seconds.

    Each failed attempt is reported through ``say``, naming the address; the last one is raised.
    Any other failure (TLS, certificate) is raised at once: waiting would not fix it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            probe_superlink(address, root_certificates)
            return
        except SuperLinkUnreachable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                if wait_s <= 0:
                    raise
                raise SuperLinkUnreachable(
                    f"{exc.problem}, for {wait_s:g} s",
                    f"{exc.hint} ([superlink] connect-wait sets how long a starting node waits)",
                ) from None
            pause = min(retry_s, left)
            say(f"fedcare: {exc.problem}; retrying in {pause:.0f} s (giving up in {left:.0f} s)")
            time.sleep(pause)
