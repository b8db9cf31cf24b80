"""Key material for a real deployment: a CA, the SuperLink's TLS certificate, hospital node keys.

`init_deployment` writes everything a coordinator needs to stand up one SuperLink and hand each
hospital a self-contained folder (its node key, the CA certificate, a `hospital.toml`):

    OUT/ca/ca.crt, ca.key            the deployment's certificate authority (keep ca.key offline)
    OUT/superlink/server.crt, .key   the SuperLink's TLS certificate (SANs: the addresses nodes dial)
    OUT/flwr-home/config.toml        the coordinator's `flwr` connection (TLS with ca.crt)
    OUT/<hospital>/node.key, .pub    the hospital's node-authentication key (EC P-384, OpenSSH)
    OUT/<hospital>/ca.crt            the root the hospital's node trusts
    OUT/<hospital>/hospital.toml     settings for `fedcare node start --config ...`
    OUT/COMMANDS.md                  the exact commands, in order

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
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.errors import FedcareError

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825
FIRST_CLIENTAPPIO_PORT = 9094       # flower-supernode's default Runtime API port
DEMO_PARTITIONS = 4                 # fed-heart-disease has 4 real hospitals
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
    """Paths `init_deployment` wrote, and the commands to use them."""

    out_dir: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    flwr_home: Path
    connection: str
    superlink_address: str
    database: Path | None               # None: the SuperLink keeps its state in memory
    hospitals: list[HospitalFiles] = field(default_factory=list)
    commands_file: Path | None = None

    def superlink_command(self, executable: str = "flower-superlink") -> list[str]:
        """The SuperLink: TLS on its one port, node authentication, its state in a file or in memory."""
        host, port = split_address(self.superlink_address)
        return [executable,
                "--ssl-ca-certfile", str(self.ca_certificate),
                "--ssl-certfile", str(self.server_certificate),
                "--ssl-keyfile", str(self.server_key),
                "--enable-supernode-auth",
                "--host", host, "--port", str(port),
                *(["--database", str(self.database)] if self.database is not None else []),
                "--disable-runtime-dependency-installation"]

    def register_command(self, hospital: HospitalFiles, executable: str = "flwr") -> list[str]:
        """Admit a hospital's node key (run by the coordinator, with FLWR_HOME set)."""
        return [executable, "supernode", "register", str(hospital.public_key), self.connection,
                "--name", hospital.name]


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) -> (host, port), or a FedcareError naming the bad address."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedcareError(f"SuperLink address '{address}' is not HOST:PORT",
                           "write it like 127.0.0.1:9092 or superlink.example.org:9092")
    return host, int(port)


def _write_private(path: Path, data: bytes, force: bool) -> None:
    """Write a secret 0600, creating it with that mode (never briefly world-readable)."""
    if path.exists():
        if not force:
            raise FedcareError(f"{path} already exists; refusing to overwrite a private key",
                               "pass --force to replace it (a replaced node key must be registered again), "
                               "or choose another output folder")
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
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_node_key(path: Path, force: bool = False) -> Path:
    """Write a hospital's node key pair: `path` (OpenSSH private, 0600) and `path.pub`; returns the .pub.

    A hospital runs this itself and sends only the .pub to the coordinator for
    `flwr supernode register`.
    """
    path = Path(path)
    _private_dir(path.parent)
    public = path.with_name(path.name.removesuffix(".key") + ".pub")
    if public.exists() and not force and not path.exists():
        raise FedcareError(f"{public} exists without its private key {path}",
                           "remove the stale .pub or pass --force")
    key = ec.generate_private_key(CURVE)
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), force)
    _write_public(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                        serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
                raise FedcareError(f"'{name}' is neither an IP address nor a DNS name",
                                   "pass --san with the address hospitals use to reach the SuperLink") from None
            entries.append(x509.DNSName(name))
    if not entries:
        raise FedcareError("the SuperLink certificate needs at least one --san", "e.g. --san 127.0.0.1")
    return x509.SubjectAlternativeName(entries)


def _make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    name = _subject("fedcare deployment CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str],
                      now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    cert = (x509.CertificateBuilder().subject_name(_subject(sans[0] if sans else "fedcare superlink"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_san(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def _connection_toml(address: str, ca: Path) -> str:
    return ('[superlink]\ndefault = "fedcare"\n\n[superlink.fedcare]\n'
            f'address = "{address}"\nroot-certificates = "{ca}"\n')


def _hospital_toml(index: int, address: str, demo: bool) -> str:
    data = (f'dataset = "fed-heart-disease"     # bundled demo data; your own: dicom / ehr-table / ehr-events\n'
            f'partition-id = {index}\n') if demo else (
            'dataset = "ehr-table"             # dicom | ehr-table | ehr-events | fed-heart-disease | ...\n'
            'data-path = "/path/to/table.csv"  # EDIT: your table (dicom: a folder + labels)\n'
            'schema = "/path/to/schema.toml"   # EDIT\n')
    return (f"# fedcare hospital node settings: `fedcare node start --config hospital.toml`\n"
            f"# Relative paths are relative to this file.\n\n"
            f"[superlink]\naddress = \"{address}\"\nroot-certificates = \"ca.crt\"\n\n"
            f"[node]\nprivate-key = \"node.key\"\n"
            f"clientappio-port = {FIRST_CLIENTAPPIO_PORT + index}   # one free port per node on this host\n"
            f"warm-clientapp = true      # fork each message's ClientApp from a warm process (false: Flower's own)\n"
            f"poll-interval = 0.5        # longest wait between message polls while a run is active (3: Flower's)\n\n"
            f"[data]\n{data}cache-dir = \"cache\"\n\n"
            f"[privacy]\nledger-dir = \"ledgers\"\nepsilon-budget = 1.0\n")


def _commands_md(files: DeploymentFiles) -> str:
    env = ("export FLWR_HOME=" + shlex.quote(str(files.flwr_home)) + " FLWR_TELEMETRY_ENABLED=0 "
           "FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1")
    lines = ["# fedcare deployment: commands, in order", "",
             f"SuperLink address: `{files.superlink_address}`; connection name for `flwr`: `{files.connection}`.",
             "Keep `ca/ca.key` offline once the SuperLink certificate is issued.", "",
             ("## 1. Coordinator: start the SuperLink (TLS, node authentication, persistent state)"
              if files.database is not None else
              "## 1. Coordinator: start the SuperLink (TLS, node authentication, state in memory)"), "",
             "    " + env,
             "    " + shlex.join(files.superlink_command()), "",
             *([] if files.database is not None else [
                 "A restarted SuperLink starts empty and the hospitals' nodes stop (Flower's SuperNode exits",
                 "once the SuperLink no longer knows it): register the hospitals again (step 2), have each",
                 "hospital start its node again (step 3), then relaunch the run with `resume=true` (fedcare's",
                 "checkpoint continues it). Where the SuperLink must keep its nodes and runs across restarts,",
                 "use `fedcare deploy init --superlink-state database`.", ""]),
             "## 2. Coordinator: register each hospital's node public key", ""]
    lines += ["    " + shlex.join(files.register_command(h)) for h in files.hospitals]
    lines += ["", "## 3. Each hospital: copy its folder there, edit `[data]` in hospital.toml, start the node", "",
              "A hospital may instead make its own key (`fedcare deploy node-key node.key`) and send only",
              "node.key's `.pub` to the coordinator for step 2.", ""]
    lines += [f"    fedcare node start --config {shlex.quote(str(h.settings))}" for h in files.hospitals]
    lines += ["", "## 4. Coordinator: run the federation and read its status", "",
              f"    flwr run . {files.connection} --run-config \"hospitals={len(files.hospitals)} "
              f"output-dir='runs/deployment'\"",
              f"    flwr ls {files.connection} --format json   # `flwr run` exits 0 even when a run failed", ""]
    return "\n".join(lines)


def init_deployment(out_dir: Path, hospitals: list[str], sans: list[str] | None = None,
                    superlink_address: str = "127.0.0.1:9092", force: bool = False,
                    superlink_state: str = "database") -> DeploymentFiles:
    """Create the CA, the SuperLink certificate, one node key per hospital, settings and COMMANDS.md.

    ``superlink_state`` (one of ``SUPERLINK_STATES``) is where the SuperLink command keeps its state.
    """
    sans = list(sans) if sans else ["127.0.0.1", "localhost"]
    out = _private_dir(Path(out_dir).resolve())
    host, _ = split_address(superlink_address)
    if not hospitals:
        raise FedcareError("no hospitals named", "pass --hospital NAME once per hospital")
    for name in hospitals:
        if not _NAME.match(name) or name in ("ca", "superlink", "flwr-home"):
            raise FedcareError(f"hospital name '{name}' cannot be a folder name",
                               "use letters, digits, '-', '_' or '.' (not ca, superlink, flwr-home)")
    if len(set(hospitals)) != len(hospitals):
        raise FedcareError("a hospital is named twice", "give each --hospital a distinct name")
    if superlink_state not in SUPERLINK_STATES:
        raise FedcareError(f"unknown SuperLink state '{superlink_state}'",
                           f"use one of: {', '.join(SUPERLINK_STATES)}")
    _san(sans)                      # every SAN is an IP or DNS name
    if host not in sans:
        raise FedcareError(f"the SuperLink address host '{host}' is not among the certificate SANs {sans}",
                           f"add --san {host}: nodes verify the certificate against the address they dial")

    now = dt.datetime.now(dt.timezone.utc)
    ca_dir, link_dir = _private_dir(out / "ca"), _private_dir(out / "superlink")
    ca_key_path, ca_cert_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if ca_key_path.exists() and not force:
        raise FedcareError(f"{ca_key_path} already exists; refusing to replace the deployment's CA",
                           "pass --force to start over (every node then needs the new ca.crt), "
                           "or choose another output folder")
    ca_key, ca_cert = _make_ca(now)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, sans, now)
    # Fail on an existing node key before writing anything.
    for name in hospitals:
        if (out / name / "node.key").exists() and not force:
            raise FedcareError(f"{out / name / 'node.key'} already exists; refusing to overwrite a node key",
                               "pass --force (the hospital must then be registered again)")
    _write_private(ca_key_path, _pem_key(ca_key), force)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_public(ca_cert_path, ca_pem)
    _write_private(link_dir / "server.key", _pem_key(server_key), force)
    _write_public(link_dir / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))

    home = _private_dir(out / "flwr-home")
    (home / "config.toml").write_text(_connection_toml(superlink_address, ca_cert_path))

    bundles = []
    for index, name in enumerate(hospitals):
        folder = _private_dir(out / name)
        public = make_node_key(folder / "node.key", force=force)
        _write_public(folder / "ca.crt", ca_pem)
        settings = folder / "hospital.toml"
        if force or not settings.exists():
            settings.write_text(_hospital_toml(index, superlink_address, demo=index < DEMO_PARTITIONS))
        bundles.append(HospitalFiles(name, folder, folder / "node.key", public, folder / "ca.crt", settings))

    files = DeploymentFiles(out, ca_cert_path, ca_key_path, link_dir / "server.crt", link_dir / "server.key",
                            home, "fedcare", superlink_address,
                            link_dir / "state.db" if superlink_state == "database" else None, bundles,
                            out / "COMMANDS.md")
    files.commands_file.write_text(_commands_md(files))
    return files
