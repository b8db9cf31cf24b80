"""Key material for a real deployment: a CA, the SuperLink's TLS certificate, hospital node keys.

`init_deployment` writes everything a coordinator needs to stand up one SuperLink and hand each
hospital a self-contained folder (its node key, the CA certificate, a `hospital.toml`):

    OUT/ca/ca.crt, ca.key            the deployment's certificate authority (keep ca.key offline)
    OUT/superlink/server.crt, .key   the public listener's TLS certificate (SANs: the addresses nodes dial)
    OUT/superlink/control.crt, .key  the control listener's TLS certificate (SANs: 127.0.0.1, localhost)
    OUT/flwr-home/config.toml        the coordinator's `flwr` connection: the control listener on
                                     127.0.0.1 (TLS with ca.crt)
    OUT/<hospital>/node.key, .pub    the hospital's node-authentication key (EC P-384, OpenSSH)
    OUT/<hospital>/ca.crt            the root the hospital's node trusts
    OUT/<hospital>/hospital.toml     settings for `fedcare node start --config ...`
    OUT/COMMANDS.md                  the exact commands, in order

The SuperLink is fedcare's launcher (`fedcare.superlink_launcher`): Flower's own SuperLink app on two
listeners. Hospitals dial the public address, which serves only the Fleet API (and /health) to
registered node keys; the Control API (runs, node registration) and the Runtime API are served
only on a loopback port of the coordinator's machine (`control_port`, by default the public port
+ 1), which is where the coordinator's `flwr` connection points. A hospital holding every file it
was given therefore cannot list, start or stop runs, nor register or remove node keys.

Why these formats: Flower 1.41's SuperNode loads its key with `load_ssh_private_key` and refuses
anything but an EC key; `flwr supernode register` accepts only an OpenSSH EC public key on a
NIST curve. The SuperLink needs CA, certificate and key (all three flags) and the nodes verify it
against the CA, so the certificate's SANs must name the address the nodes dial. Private keys are
written 0600 inside 0700 folders and are never overwritten unless asked (`force`): overwriting a
registered node key would lock that hospital out; overwriting the CA would invalidate every node.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.errors import FedcareError
from secure_aggregation.identity import Roster, make_identity_key

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825
FIRST_CLIENTAPPIO_PORT = 9094  # flower-supernode's default Runtime API port
CONTROL_HOST = "127.0.0.1"  # the control listener (Control + Runtime APIs) binds loopback only
CONTROL_SANS = ["127.0.0.1", "localhost"]
DEMO_PARTITIONS = 4  # fed-heart-disease has 4 real hospitals
# Where the SuperLink keeps its state (registered node keys, runs, messages in flight):
#   database: a SQLite file (--database); a restarted SuperLink knows its nodes and runs.
#   memory:   Flower's in-memory state, about half the SuperLink CPU per request (measured in
#             bench/bench_deployment_overhead.py); a restarted SuperLink starts empty and the
#             SuperNodes exit, so every hospital starts its node again.
SUPERLINK_STATES = ("database", "memory")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class HospitalFiles:
    """One hospital's bundle: what is copied to that hospital (never the other hospitals' keys)."""

    name: str
    folder: Path
    private_key: Path
    public_key: Path
    root_certificate: Path
    settings: Path


@dataclass(frozen=True)
class DeploymentFiles:
    """Paths `init_deployment` wrote, and the commands to use them.

    ``superlink_address`` is the public listener hospitals dial; ``control_address`` the loopback
    listener the coordinator's ``connection`` uses. The control fields have defaults so a
    DeploymentFiles built before they existed still works: control port = public port + 1, and
    without a control certificate the public one serves both listeners (it must then name 127.0.0.1).
    """

    out_dir: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    flwr_home: Path
    connection: str
    superlink_address: str
    database: Path | None  # None: the SuperLink keeps its state in memory
    hospitals: list[HospitalFiles] = field(default_factory=list)
    commands_file: Path | None = None
    control_port: int | None = None  # None: the public port + 1 (see default_control_port)
    control_certificate: Path | None = None
    control_key: Path | None = None

    @property
    def control_address(self) -> str:
        """The loopback control listener: `flwr` (runs, node registration) and the SuperExec connect here."""
        port = self.control_port or default_control_port(split_address(self.superlink_address)[1])
        return f"{CONTROL_HOST}:{port}"

    def superlink_command(self, executable: str = "python") -> list[str]:
        """fedcare's SuperLink launcher: the public Fleet listener (TLS, registered node keys only) and the
        loopback control listener (TLS), its state in a file or in memory.

        ``executable`` is the Python of the environment holding fedcare and Flower. Given Flower's
        `flower-superlink` executable instead (what callers passed before the launcher), the
        `python` beside it is used: same environment, and never Flower's single-port SuperLink.
        """
        host, port = split_address(self.superlink_address)
        control = (
            []
            if self.control_certificate is None or self.control_key is None
            else [
                "--control-ssl-certfile",
                str(self.control_certificate),
                "--control-ssl-keyfile",
                str(self.control_key),
            ]
        )
        return [
            _launcher_python(executable),
            "-m",
            "fedcare.superlink_launcher",
            "--host",
            host,
            "--port",
            str(port),
            "--control-port",
            str(split_address(self.control_address)[1]),
            "--ssl-ca-certfile",
            str(self.ca_certificate),
            "--ssl-certfile",
            str(self.server_certificate),
            "--ssl-keyfile",
            str(self.server_key),
            *control,
            *(["--database", str(self.database)] if self.database is not None else []),
            "--disable-runtime-dependency-installation",
        ]

    def register_command(self, hospital: HospitalFiles, executable: str = "flwr") -> list[str]:
        """Admit a hospital's node key (run by the coordinator, with FLWR_HOME set)."""
        return [executable, "supernode", "register", str(hospital.public_key), self.connection, "--name", hospital.name]


def _launcher_python(executable: str) -> str:
    """The Python that runs the launcher: ``executable``, or the one beside a `flower-superlink` path."""
    path = Path(executable)
    if not path.name.startswith("flower-superlink"):
        return executable
    if path.parent == Path("."):
        return "python"
    return next((str(c) for c in (path.with_name("python"), path.with_name("python3")) if c.exists()), sys.executable)


def default_control_port(public_port: int) -> int:
    """The control listener's port when none is given: the public port + 1 (- 1 at the top of the range)."""
    return public_port + 1 if public_port < 65535 else public_port - 1


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) -> (host, port), or a FedcareError naming the bad address."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedcareError(
            f"SuperLink address '{address}' is not HOST:PORT",
            "write it like 127.0.0.1:9092 or superlink.example.org:9092",
        )
    return host, int(port)


def _write_private(path: Path, data: bytes, force: bool) -> None:
    """Write a secret 0600, creating it with that mode (never briefly world-readable)."""
    if path.exists():
        if not force:
            raise FedcareError(
                f"{path} already exists; refusing to overwrite a private key",
                "pass --force to replace it (a replaced node key must be registered again), "
                "or choose another output folder",
            )
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_node_key(path: Path, force: bool = False) -> Path:
    """Write a hospital's node key pair: `path` (OpenSSH private, 0600) and `path.pub`; returns the .pub.

    A hospital runs this itself and sends only the .pub to the coordinator for
    `flwr supernode register`.
    """
    path = Path(path)
    _private_dir(path.parent)
    public = path.with_name(path.name.removesuffix(".key") + ".pub")
    if public.exists() and not force and not path.exists():
        raise FedcareError(f"{public} exists without its private key {path}", "remove the stale .pub or pass --force")
    key = ec.generate_private_key(CURVE)
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        force,
    )
    _write_public(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
    )
    return public


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
                raise FedcareError(
                    f"'{name}' is neither an IP address nor a DNS name",
                    "pass --san with the address hospitals use to reach the SuperLink",
                ) from None
            entries.append(x509.DNSName(name))
    if not entries:
        raise FedcareError("the SuperLink certificate needs at least one --san", "e.g. --san 127.0.0.1")
    return x509.SubjectAlternativeName(entries)


def _make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    name = _subject("fedcare deployment CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str], now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(sans[0] if sans else "fedcare superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _connection_toml(control_address: str, ca: Path) -> str:
    """The coordinator's `flwr` connection: the loopback control listener, TLS verified against the CA."""
    return (
        "# The control listener of fedcare's SuperLink: reachable from the coordinator's machine only.\n"
        '[superlink]\ndefault = "fedcare"\n\n[superlink.fedcare]\n'
        f'address = "{control_address}"\nroot-certificates = "{ca}"\n'
    )


def _hospital_toml(index: int, address: str, demo: bool, name: str = "") -> str:
    data = (
        (
            f'dataset = "fed-heart-disease"     # bundled demo data; your own: dicom / ehr-table / ehr-events\n'
            f"partition-id = {index}\n"
        )
        if demo
        else (
            'dataset = "ehr-table"             # dicom | ehr-table | ehr-events | fed-heart-disease | ...\n'
            'data-path = "/path/to/table.csv"  # EDIT: your table (dicom: a folder + labels)\n'
            'schema = "/path/to/schema.toml"   # EDIT\n'
        )
    )
    dataset_id = f"{name or f'hospital-{index}'}-{'heart-disease' if demo else 'ehr'}"
    return (
        f"# fedcare hospital node settings: `fedcare node start --config hospital.toml`\n"
        f"# Relative paths are relative to this file.\n\n"
        f'[superlink]\naddress = "{address}"\nroot-certificates = "ca.crt"\n\n'
        f'[node]\nprivate-key = "node.key"\n'
        f"clientappio-port = {FIRST_CLIENTAPPIO_PORT + index}   # one free port per node on this host\n"
        f"warm-clientapp = true      # fork each message's ClientApp from a warm process (false: one fresh process each)\n"
        f"poll-interval = 0.5        # longest wait between message polls while a run is active (3: Flower's)\n\n"
        f'[data]\n{data}dataset-id = "{dataset_id}"   # the identity your privacy ledger is kept under: '
        f'keep it when rows are added\ncache-dir = "cache"\n\n'
        f"[privacy]   # this hospital's policy: every request is checked against it before anything is released\n"
        f'ledger-dir = "ledgers"\n'
        f"epsilon-budget = 1.0                 # lifetime epsilon on this dataset (raise: `fedcare node budget`)\n"
        f"# max-run-epsilon = 1.0              # the most one run may spend (default: the budget)\n"
        f"delta = 1e-4                         # the delta this hospital accounts at\n"
        f"require-dp = true\n"
        f"require-secure-aggregation = true\n"
        f"min-hospitals = 3                    # the smallest federation this hospital joins\n"
        f"min-secagg-threshold = 2             # the smallest secure-aggregation threshold (always > half)\n"
        f"max-secagg-clip-range = 10.0         # the widest range of one masked update value\n"
        f'release-evaluation = "per-hospital"  # or "none": no test metrics leave the hospital\n'
        f"hardened-noise = false               # true: Opacus's floating-point-attack mitigation (slower steps)\n\n"
        f"[consortium]   # secure aggregation: who this hospital accepts as peers\n"
        f'name = "{name or f"hospital-{index}"}"          # this hospital\'s name on the roster\n'
        f'roster = "roster.toml"      # the consortium roster, pinned after checking every fingerprint\n'
        f'identity-key = "identity.key" # this hospital\'s own identity key (0600; make your own: '
        f"`fedcare deploy identity-key`)\n\n"
        f"[code]\n"
        f'# approved-fabs = ["sha256:..."]     # FABs this node runs; or `fedcare node approve --config '
        f"hospital.toml app.fab`\n"
    )


def _commands_md_overview(files: DeploymentFiles) -> list[str]:
    """COMMANDS.md's head: the two addresses, the CA key, the certificates' lifetime and the two listeners."""
    return [
        "# fedcare deployment: commands, in order",
        "",
        f"Public SuperLink address (hospitals dial it): `{files.superlink_address}`.",
        f"Control address (this machine only): `{files.control_address}`; connection name for `flwr`: "
        f"`{files.connection}` (in `{files.flwr_home / 'config.toml'}`).",
        "Keep `ca/ca.key` offline once the SuperLink certificates are issued.",
        f"They expire after {SERVER_DAYS} days: `fedcare deploy renew {shlex.quote(str(files.out_dir))}` "
        "reissues them (with ca/ca.key back in place), then restart the SuperLink.",
        "",
        "## The SuperLink's two listeners",
        "",
        f"- public `{files.superlink_address}` (TLS, `superlink/server.crt`): only the Fleet API and `/health`,",
        "  and only to registered node keys. Open this port to the hospitals, and nothing else.",
        f"- control `{files.control_address}` (TLS, `superlink/control.crt`): the Control API (runs, node",
        "  registration), the Runtime API (ServerApps) and Fleet; it binds loopback only. Flower 1.41's",
        "  Control API has no authentication of its own: whoever reaches this port controls the federation,",
        "  so never forward or proxy it. `flwr supernode register` and `flwr run` / `flwr ls` use the",
        f"  `{files.connection}` connection on this machine, which points here.",
        "",
        "A hospital holding its own files (ca.crt, node.key, hospital.toml) reaches only the public",
        "listener: any `flwr` command or Control/Runtime request sent there gets 404 Not Found.",
        "",
    ]


def _commands_md_app_steps(files: DeploymentFiles) -> list[str]:
    """COMMANDS.md's steps 3 to 5: build and approve the app, start the nodes, run the federation."""
    lines: list[str] = []
    lines += [
        "",
        "## 3. Coordinator: build the app and tell every hospital its digest",
        "",
        "    fedcare deploy fab . --out app.fab   # the FAB `flwr run .` ships: its sha256 and files",
        "",
        "## 4. Each hospital: copy its folder there, edit `[data]` and `[privacy]` in hospital.toml, "
        "approve the app, start the node",
        "",
        f"hospital.toml dials the public address `{files.superlink_address}`. A node runs only an app "
        "its hospital approved.",
        "A hospital may instead make its own keys (`fedcare deploy node-key node.key`,",
        "`fedcare deploy identity-key identity.key`) and send only the public halves: the node key's",
        "`.pub` for step 2, the identity key's `ed25519:` line for the consortium roster",
        "(`fedcare deploy roster`). The roster.toml written here holds keys this machine made: for",
        "real use every hospital makes its own identity key and checks every fingerprint directly",
        "with the other hospitals before pinning the roster.",
        "",
    ]
    for h in files.hospitals:
        lines += [
            f"    fedcare node approve --config {shlex.quote(str(h.settings))} app.fab",
            f"    fedcare node start --config {shlex.quote(str(h.settings))}",
        ]
    lines += [
        "",
        "## 5. Coordinator (on the SuperLink's machine, in the app folder): run the federation",
        "",
        f"    fedcare run {shlex.quote(str(files.out_dir))} --rounds 15 --output-dir runs/deployment",
        "",
        f"It submits the app to the `{files.connection}` connection with the output directory as an absolute "
        "path, prints each round's progress and the final table, and exits 1 with the reason when the run "
        "fails or the hospitals refuse it (it reads the run's status from `flwr ls`). After a crash: the same "
        "command with `--resume`.",
        "",
    ]
    return lines


def _commands_md(files: DeploymentFiles) -> str:
    env = (
        "export FLWR_HOME=" + shlex.quote(str(files.flwr_home)) + " FLWR_TELEMETRY_ENABLED=0 "
        "FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
    )
    lines = _commands_md_overview(files)
    lines += [
        (
            "## 1. Coordinator: start the SuperLink (TLS, node authentication, persistent state)"
            if files.database is not None
            else "## 1. Coordinator: start the SuperLink (TLS, node authentication, state in memory)"
        ),
        "",
        "    " + env,
        "    " + shlex.join(files.superlink_command()),
        "",
        "Run it with the Python of fedcare's environment (e.g. `.venv/bin/python`). It refuses to start",
        "on any Flower version but the one it was verified with (it never falls back to Flower's",
        "single-port `flower-superlink`); SIGINT/SIGTERM stop both listeners and the SuperExec.",
        "",
        *(
            []
            if files.database is not None
            else [
                "A restarted SuperLink starts empty and the hospitals' nodes stop (Flower's SuperNode exits",
                "once the SuperLink no longer knows it): register the hospitals again (step 2), have each",
                "hospital start its node again (step 3), then relaunch the run with `resume=true` (fedcare's",
                "checkpoint continues it). Where the SuperLink must keep its nodes and runs across restarts,",
                "use `fedcare deploy init --superlink-state database`.",
                "",
            ]
        ),
        "## 2. Coordinator (on the SuperLink's machine): register each hospital's node public key",
        "",
    ]
    lines += ["    " + shlex.join(files.register_command(h)) for h in files.hospitals]
    lines += _commands_md_app_steps(files)
    return "\n".join(lines)


def _enclosing_app(path: Path) -> Path | None:
    """The Flower app folder ``path`` lies in (a pyproject.toml with ``[tool.flwr.app]``), if any."""
    for folder in (path, *path.parents):
        project = folder / "pyproject.toml"
        try:
            if project.is_file() and "[tool.flwr.app]" in project.read_text(errors="replace"):
                return folder
        except OSError:
            continue
    return None


def _identity_key(path: Path, force: bool) -> bytes:
    """A hospital's secure-aggregation identity key (kept if it exists): its raw public half."""
    from secure_aggregation.identity import load_identity_key, public_bytes

    if path.exists() and not force:
        return public_bytes(load_identity_key(path))
    return make_identity_key(path, force=True)


def renew_superlink_certificates(out_dir: Path, now: dt.datetime | None = None) -> list[Path]:
    """Reissue the SuperLink's two TLS certificates (and keys) from the deployment's CA, keeping their SANs.

    What an expired (or soon expiring) SuperLink certificate needs: the CA, the node keys, the
    hospitals' files and the registrations stay as they are; the SuperLink is restarted with the
    new files. ``now`` is the issuing time (the certificates are valid from 5 minutes before it for
    ``SERVER_DAYS``). Returns the paths written.
    """
    out = Path(out_dir).expanduser().resolve()
    ca_cert_path, ca_key_path, link_dir = out / "ca" / "ca.crt", out / "ca" / "ca.key", out / "superlink"
    for needed in (ca_cert_path, ca_key_path, link_dir / "server.crt"):
        if not needed.is_file():
            raise FedcareError(
                f"{needed} does not exist: {out} is not a deployment folder with its CA key",
                "give the folder `fedcare deploy init` wrote (renewing needs ca/ca.key)",
            )
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise FedcareError(
            f"{ca_cert_path} or {ca_key_path} is not readable", "restore the CA from its backup"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FedcareError(f"{ca_key_path} is not the deployment's EC CA key", "restore the CA from its backup")
    now = now or dt.datetime.now(dt.UTC)
    written = []
    for name, default_sans in (("server", None), ("control", CONTROL_SANS)):
        certificate_path = link_dir / f"{name}.crt"
        sans = _sans_of(certificate_path) if certificate_path.is_file() else default_sans
        if sans is None:
            raise FedcareError(f"{certificate_path} names no SANs", "make a new deployment with `fedcare deploy init`")
        key, certificate = _make_server_cert(ca_key, ca_cert, sans, now)
        _write_private(link_dir / f"{name}.key", _pem_key(key), force=True)
        _write_public(certificate_path, certificate.public_bytes(serialization.Encoding.PEM))
        written += [certificate_path, link_dir / f"{name}.key"]
    return written


def _sans_of(certificate_path: Path) -> list[str] | None:
    """The SANs of an issued certificate, as `--san` values (a corrupt or SAN-less one: None)."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return [str(name.value) for name in names] or None


def init_deployment(
    out_dir: Path,
    hospitals: list[str],
    sans: list[str] | None = None,
    superlink_address: str = "127.0.0.1:9092",
    force: bool = False,
    superlink_state: str = "database",
    control_port: int | None = None,
    inside_app: bool = False,
) -> DeploymentFiles:
    """Create the CA, the SuperLink certificates, one node key per hospital, settings and COMMANDS.md.

    The output holds private keys, and later the coordinator's FLWR_HOME (with every installed FAB):
    it is refused inside a Flower app folder (one whose pyproject.toml has ``[tool.flwr.app]``) unless
    ``inside_app``, so nothing of it can travel in a FAB or break Flower's build.

    ``superlink_address`` is the public listener hospitals dial; ``control_port`` the loopback
    control listener's port (default: the public port + 1), where the coordinator's `flwr`
    connection points. ``superlink_state`` (one of ``SUPERLINK_STATES``) is where the SuperLink
    command keeps its state.
    """
    sans = list(sans) if sans else ["127.0.0.1", "localhost"]
    _refuse_inside_app(out_dir, inside_app)
    out = _private_dir(Path(out_dir).resolve())
    host, public_port = split_address(superlink_address)
    control_port = _checked_control_port(public_port, control_port)
    _check_hospital_names(hospitals)
    if superlink_state not in SUPERLINK_STATES:
        raise FedcareError(f"unknown SuperLink state '{superlink_state}'", f"use one of: {', '.join(SUPERLINK_STATES)}")
    _san(sans)  # every SAN is an IP or DNS name
    if host not in sans:
        raise FedcareError(
            f"the SuperLink address host '{host}' is not among the certificate SANs {sans}",
            f"add --san {host}: nodes verify the certificate against the address they dial",
        )

    ca_cert_path, ca_key_path, link_dir, ca_pem = _write_ca_and_superlink(out, hospitals, sans, force)
    home = _private_dir(out / "flwr-home")
    (home / "config.toml").write_text(_connection_toml(f"{CONTROL_HOST}:{control_port}", ca_cert_path))
    bundles = _write_hospital_folders(out, hospitals, superlink_address, ca_pem, force)

    files = DeploymentFiles(
        out,
        ca_cert_path,
        ca_key_path,
        link_dir / "server.crt",
        link_dir / "server.key",
        home,
        "fedcare",
        superlink_address,
        link_dir / "state.db" if superlink_state == "database" else None,
        bundles,
        out / "COMMANDS.md",
        control_port,
        link_dir / "control.crt",
        link_dir / "control.key",
    )
    cast(Path, files.commands_file).write_text(_commands_md(files))  # set just above
    return files


def _refuse_inside_app(out_dir: Path, inside_app: bool) -> None:
    """Refuse a deployment folder inside a Flower app folder unless ``inside_app`` (its keys would travel in a FAB)."""
    app = _enclosing_app(Path(out_dir).resolve())
    if app is not None and not inside_app:
        raise FedcareError(
            f"{Path(out_dir).resolve()} is inside the Flower app {app}: its keys, ledgers and FLWR_HOME "
            "would sit in the folder `flwr run` packs",
            f"write the deployment outside the app, e.g. {app.parent / 'fedcare-deploy'} (or pass "
            "--inside-app and list the folder in the app's .gitignore)",
        )


def _checked_control_port(public_port: int, control_port: int | None) -> int:
    """The control listener's port (default: the public port + 1), refused if invalid or the public port."""
    control_port = default_control_port(public_port) if control_port is None else control_port
    if not 0 < control_port < 65536:
        raise FedcareError(
            f"control port {control_port} is not a port number",
            "choose a free port from 1 to 65535 (default: the public port + 1)",
        )
    if control_port == public_port:
        raise FedcareError(
            f"the control port and the public SuperLink port are both {control_port}",
            "give the control listener its own port (default: the public port + 1)",
        )
    return control_port


def _check_hospital_names(hospitals: list[str]) -> None:
    """At least one hospital, each a distinct name usable as a folder name."""
    if not hospitals:
        raise FedcareError("no hospitals named", "pass --hospital NAME once per hospital")
    for name in hospitals:
        if not _NAME.match(name) or name in ("ca", "superlink", "flwr-home"):
            raise FedcareError(
                f"hospital name '{name}' cannot be a folder name",
                "use letters, digits, '-', '_' or '.' (not ca, superlink, flwr-home)",
            )
    if len(set(hospitals)) != len(hospitals):
        raise FedcareError("a hospital is named twice", "give each --hospital a distinct name")


def _write_ca_and_superlink(
    out: Path, hospitals: list[str], sans: list[str], force: bool
) -> tuple[Path, Path, Path, bytes]:
    """Write the CA and the SuperLink's server and control certificates (refusing to replace keys without force).

    Returns the CA certificate path, the CA key path, the SuperLink folder and the CA certificate (PEM).
    """
    now = dt.datetime.now(dt.UTC)
    ca_dir, link_dir = _private_dir(out / "ca"), _private_dir(out / "superlink")
    ca_key_path, ca_cert_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if ca_key_path.exists() and not force:
        raise FedcareError(
            f"{ca_key_path} already exists; refusing to replace the deployment's CA",
            "pass --force to start over (every node then needs the new ca.crt), or choose another output folder",
        )
    ca_key, ca_cert = _make_ca(now)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, sans, now)
    # Fail on an existing node key before writing anything.
    for name in hospitals:
        if (out / name / "node.key").exists() and not force:
            raise FedcareError(
                f"{out / name / 'node.key'} already exists; refusing to overwrite a node key",
                "pass --force (the hospital must then be registered again)",
            )
    _write_private(ca_key_path, _pem_key(ca_key), force)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_public(ca_cert_path, ca_pem)
    control_key, control_cert = _make_server_cert(ca_key, ca_cert, CONTROL_SANS, now)
    _write_private(link_dir / "server.key", _pem_key(server_key), force)
    _write_public(link_dir / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(link_dir / "control.key", _pem_key(control_key), force)
    _write_public(link_dir / "control.crt", control_cert.public_bytes(serialization.Encoding.PEM))
    return ca_cert_path, ca_key_path, link_dir, ca_pem


def _write_hospital_folders(
    out: Path, hospitals: list[str], superlink_address: str, ca_pem: bytes, force: bool
) -> list[HospitalFiles]:
    """One folder per hospital (node key, CA certificate, identity key, hospital.toml) and the shared roster."""
    bundles = []
    identities = {}
    for index, name in enumerate(hospitals):
        folder = _private_dir(out / name)
        public = make_node_key(folder / "node.key", force=force)
        _write_public(folder / "ca.crt", ca_pem)
        identities[name] = _identity_key(folder / "identity.key", force)
        settings = folder / "hospital.toml"
        if force or not settings.exists():
            settings.write_text(_hospital_toml(index, superlink_address, demo=index < DEMO_PARTITIONS, name=name))
        bundles.append(HospitalFiles(name, folder, folder / "node.key", public, folder / "ca.crt", settings))
    roster = Roster.text(identities)
    _write_public(out / "roster.toml", roster.encode())
    for bundle in bundles:
        _write_public(bundle.folder / "roster.toml", roster.encode())
    return bundles
