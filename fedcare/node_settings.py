"""A hospital node's settings (`hospital.toml`): validated, turned into the `flower-supernode` command.

Hospital IT edits one file; this module checks it completely before anything connects (unknown
keys, missing certificates/keys, unreadable data, a busy port) and then builds the exact
`flower-supernode` command, so nothing is typed by hand. Example::

    [superlink]
    address = "superlink.example.org:9092"
    root-certificates = "ca.crt"          # the deployment's CA: TLS is not optional
    connect-wait = 120                    # seconds `node start` waits for an unreachable SuperLink (0: none)

    [node]
    private-key = "node.key"              # EC P-384, OpenSSH format; its .pub is registered
    clientappio-port = 9094               # this SuperNode's local Runtime API port (one per node)
    warm-clientapp = true                 # fork ClientApps from a warm executor (default; false: Flower's own)
    poll-interval = 0.5                   # longest wait between message polls during a run (3 = Flower's)

    [data]
    dataset = "dicom"                     # fed-heart-disease | dicom | ehr-table | ehr-events | pbc2 | synthetic-imaging
    dataset-id = "radiology-chest-2026"   # the identity this hospital's privacy ledger is kept under
    data-path = "/data/dicom"
    labels = "/data/dicom/labels.csv"

    [privacy]                             # this hospital's policy: checked before every release
    ledger-dir = "ledgers"
    epsilon-budget = 1.0                  # lifetime epsilon on this dataset (required)
    max-run-epsilon = 1.0                 # the most one run may spend (default: no limit but the budget)
    delta = 1e-5                          # the delta this hospital accounts at
    require-dp = true
    require-secure-aggregation = true
    min-hospitals = 3                     # the smallest federation it joins
    min-secagg-threshold = 2              # the smallest threshold it accepts (and always t > n/2)
    max-secagg-clip-range = 10.0          # the widest range of a masked update value
    release-evaluation = "per-hospital"   # or "none"
    hardened-noise = false                # true: float64 noise with Opacus's floating-point-attack mitigation

    [consortium]                          # secure aggregation: who this hospital accepts as peers
    name = "Cleveland"                    # this hospital's name on the roster
    roster = "roster.toml"                # pinned after checking every member's fingerprint
    identity-key = "identity.key"         # this hospital's own identity key (0600)

    [code]
    approved-fabs = ["sha256:..."]        # FABs this node runs (also `fedcare node approve`)

Relative paths are relative to the settings file. `clientappio-port` becomes flower-supernode's
`--host 127.0.0.1 --port N` (Flower 1.41 removed `--clientappio-api-address`); the ClientApp
process it starts talks to the node over that loopback port only.

`warm-clientapp` and `poll-interval` cut the time a deployment round spends waiting (see
`fedcare/node_launcher.py` and docs/benchmarks.md). The node always runs fedcare's ClientApp
executor, which runs only approved apps (`[code]`, `fedcare node approve`): forked from a warm
process, or with `warm-clientapp = false` one fresh interpreter per message; `poll-interval = 3`
keeps Flower's own polling.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.node_policy import NODE_CONFIG_KEYS, NodePolicy
from fedcare.dataset_registry import REGISTRY
from fedcare.errors import FedcareError
from fedcare.tls_files import read_ca_certificates, read_node_key

DATA_KEYS = {  # dataset -> (required keys, optional keys) in [data], from the dataset registry
    name: (set(spec.required_keys), set(spec.optional_keys)) for name, spec in REGISTRY.items()
}
SECTIONS: dict[str, set[str]] = {
    "superlink": {"address", "root-certificates", "connect-wait"},
    "node": {"private-key", "clientappio-port", "max-retries", "warm-clientapp", "poll-interval"},
    "data": {
        "dataset",
        "dataset-id",
        "cache-dir",
        "partition-id",
        "data-path",
        "labels",
        "schema",
        "data-root",
        "multiframe",
        "require-deidentified",
        "on-unreadable",
    },
    "privacy": {"ledger-dir", *NODE_CONFIG_KEYS.values()},
    "code": {"approved-fabs", "approval-store"},
    "consortium": {"name", "roster", "identity-key"},
}
CHOICES = {"multiframe": ("first", "every", "reject"), "on-unreadable": ("error", "skip")}
DEFAULT_POLL_S = 0.5  # longest poll wait while a run is active (Flower 1.41: a fixed 3 s)
DEFAULT_SUPERLINK_WAIT_S = 120.0  # how long `node start` waits for an unreachable SuperLink before it gives up
MAX_SUPERLINK_WAIT_S = 86400.0
FLOWER_POLL_S = 3.0


@dataclass(frozen=True)
class NodeSettings:
    """One hospital node, resolved: absolute paths, typed values, the node config Flower gets."""

    path: Path
    superlink_address: str
    root_certificates: Path
    private_key: Path
    clientappio_port: int
    dataset: str
    node_config: dict[str, str | int | float | bool] = field(default_factory=dict)
    max_retries: int | None = None
    warm_clientapp: bool = True
    poll_interval: float = DEFAULT_POLL_S
    approved_fabs: tuple[str, ...] = ()  # [code] approved-fabs: digests this node runs
    approved_fabs_store: Path | None = None  # [code] approval-store (default <ledger-dir>/approved-fabs.json)
    superlink_wait_s: float = DEFAULT_SUPERLINK_WAIT_S  # [superlink] connect-wait

    @property
    def public_key(self) -> Path:
        """The key to send to the coordinator for `flwr supernode register`."""
        return self.private_key.with_name(self.private_key.name.removesuffix(".key") + ".pub")


def _err(settings: Path, where: str, problem: str, hint: str) -> FedcareError:
    return FedcareError(f"{settings}: {where}: {problem}", hint)


class _Reader:
    """Typed access to one parsed settings file, every error naming the file and the key."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path, self.doc, self.base = path, doc, path.parent

    def get(self, section: str, key: str, kind: type, required: bool = False) -> Any:
        value = self.doc.get(section, {}).get(key)
        if value is None:
            if required:
                raise _err(self.path, f"[{section}] {key}", "is missing", f"add `{key} = ...` under [{section}]")
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise _err(
                self.path,
                f"[{section}] {key}",
                f"must be {kind.__name__}, not {type(value).__name__}",
                "strings need quotes, numbers and true/false do not",
            )
        return value

    def file(self, section: str, key: str, required: bool = True, directory: bool = False) -> Path | None:
        text = self.get(section, key, str, required)
        if text is None:
            return None
        path = (self.base / Path(text).expanduser()).resolve()
        where = f"[{section}] {key}"
        if not path.exists():
            raise _err(self.path, where, f"{path} does not exist", "fix the path (relative paths start at this file)")
        if directory and not path.is_dir():
            raise _err(self.path, where, f"{path} is not a folder", "point it at the folder")
        if not directory and not path.is_file():
            raise _err(self.path, where, f"{path} is not a file", "point it at the file")
        if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
            raise _err(
                self.path,
                where,
                f"{path} is not readable by this user",
                "run the node as a user that can read it, or fix its permissions",
            )
        return path

    def folder_to_create(self, section: str, key: str, default: str) -> Path:
        path = (self.base / Path(self.get(section, key, str) or default).expanduser()).resolve()
        probe = path if path.exists() else next(p for p in path.parents if p.exists())
        if probe is path and not path.is_dir():
            raise _err(self.path, f"[{section}] {key}", f"{path} is a file", "point it at a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise _err(
                self.path,
                f"[{section}] {key}",
                f"{probe} is not writable by this user",
                "choose a folder the node's user owns",
            )
        return path


def _check_unknown(path: Path, doc: dict[str, Any]) -> None:
    for section, body in doc.items():
        if section not in SECTIONS:
            raise _err(path, f"[{section}]", "unknown section", f"sections are {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise _err(path, section, "must be a [section], not a value", f"write [{section}] on its own line")
        for key in body:
            if key not in SECTIONS[section]:
                raise _err(
                    path,
                    f"[{section}] {key}",
                    "unknown key",
                    f"keys allowed in [{section}]: {', '.join(sorted(SECTIONS[section]))}",
                )


def port_is_free(port: int) -> bool:
    """Whether the SuperNode's Runtime API could listen on 127.0.0.1:port now.

    The probe sets SO_REUSEADDR as the node's own server (uvicorn) does: connections a stopped node
    left in TIME-WAIT (a minute after a crash or restart) then do not count, only a live listener.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """Who listens on local TCP ``port``: "process PID (program and its first arguments)", or None when no
    listener is visible to this user (another user's process, or not Linux)."""
    try:
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
        for entry in Path("/proc").iterdir() if inodes else ():
            if not entry.name.isdigit():
                continue
            try:
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                    program = " ".join(" ".join([Path(argv[0]).name, *argv[1:3]]).split())[:80]
                    return f"process {entry.name} ({program})"
            except OSError:  # another user's process, or gone meanwhile
                continue
    except OSError:
        return None
    return None


def _private_key(reader: _Reader) -> Path:
    key = reader.file("node", "private-key")
    assert key is not None
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        raise _err(
            reader.path, "[node] private-key", f"{key} is readable by other users (mode {mode:04o})", f"chmod 600 {key}"
        )
    read_node_key(key, f"{reader.path}: [node] private-key")  # parses: EC, OpenSSH, unencrypted
    return key


def check_credentials(settings: NodeSettings) -> None:
    """Read the node's TLS root (``[superlink] root-certificates``): PEM, a CA, in date; FedcareError naming it.

    Flower's SuperNode does not read the file until it connects, and a corrupted one leaves it
    hanging with its port held; `fedcare node start` (and `--check-only`) call this first.
    """
    read_ca_certificates(settings.root_certificates, f"{settings.path}: [superlink] root-certificates")


def _data_config(reader: _Reader, dataset: str) -> dict[str, str | int | float | bool]:
    required, optional = DATA_KEYS[dataset]
    present = {k for k in reader.doc.get("data", {}) if k not in ("dataset", "dataset-id", "cache-dir")}
    for key in sorted(required - present):
        raise _err(
            reader.path,
            f"[data] {key}",
            f"is missing (dataset '{dataset}' needs {', '.join(sorted(required))})",
            f"add `{key} = ...` under [data]",
        )
    for key in sorted(present - required - optional):
        raise _err(
            reader.path,
            f"[data] {key}",
            f"is not used by dataset '{dataset}'",
            "remove it, or set dataset to the kind of data it describes",
        )
    config: dict[str, str | int | float | bool] = {}
    if "partition-id" in required:
        pid = reader.get("data", "partition-id", int, True)
        limit = REGISTRY[dataset].hospitals  # a bundled dataset's fixed count; else any partition
        if pid < 0 or (limit is not None and pid >= limit):
            raise _err(
                reader.path,
                "[data] partition-id",
                f"{pid} is out of range",
                f"use 0..{limit - 1}" if limit else "use the hospital's 0-based index",
            )
        config["partition-id"] = pid
    if "data-path" in required:
        config["data-path"] = str(reader.file("data", "data-path", directory=dataset == "dicom"))
    if "data-root" in required:
        config["data-root"] = str(reader.file("data", "data-root", directory=True))
    for key in ("schema", "labels"):
        if key in present:
            config[key] = str(reader.file("data", key))
    for key, choices in CHOICES.items():
        if key in present:
            value = reader.get("data", key, str)
            if value not in choices:
                raise _err(
                    reader.path,
                    f"[data] {key}",
                    f"'{value}' is not one of {', '.join(choices)}",
                    f"set {key} to one of: {', '.join(choices)}",
                )
            config[key] = value
    if "require-deidentified" in present:
        config["require-deidentified"] = reader.get("data", "require-deidentified", bool)
    config["cache-dir"] = str(reader.folder_to_create("data", "cache-dir", "cache"))
    return config


def _superlink_section(reader: _Reader, path: Path) -> tuple[Any, Any, Any]:
    """[superlink]: (address, root certificates, connect-wait or None), each checked."""
    address = reader.get("superlink", "address", str, True)
    from fedcare.deploy_pki import split_address

    try:
        split_address(address)
    except FedcareError as exc:
        raise _err(path, "[superlink] address", exc.problem, exc.hint) from None
    root = reader.file("superlink", "root-certificates")
    wait = reader.get("superlink", "connect-wait", float)
    if wait is not None and not 0 <= wait <= MAX_SUPERLINK_WAIT_S:
        raise _err(
            path,
            "[superlink] connect-wait",
            f"{wait} is outside 0..{MAX_SUPERLINK_WAIT_S:g} seconds",
            f"use e.g. {DEFAULT_SUPERLINK_WAIT_S:g} (0: give up at once when the SuperLink does not answer)",
        )
    return address, root, wait


def _node_section(reader: _Reader, path: Path, check_port: bool) -> tuple[Any, Any, Any, Any]:
    """[node]: (clientappio port, max-retries, warm-clientapp, poll-interval), each checked; None where unset."""
    port = reader.get("node", "clientappio-port", int) or 9094
    if not 1024 <= port <= 65535:
        raise _err(path, "[node] clientappio-port", f"{port} is outside 1024..65535", "choose a free local port")
    if check_port and not port_is_free(port):
        holder = port_holder(port)
        raise _err(
            path,
            "[node] clientappio-port",
            f"127.0.0.1:{port} is already in use" + (f" (listening: {holder})" if holder else ""),
            "another SuperNode (or program) holds it: stop it, or give each node on this host its own port",
        )
    retries = reader.get("node", "max-retries", int)
    warm = reader.get("node", "warm-clientapp", bool)
    poll = reader.get("node", "poll-interval", float)
    if poll is not None and not 0.05 <= poll <= 60:
        raise _err(
            path,
            "[node] poll-interval",
            f"{poll} is outside 0.05..60 seconds",
            f"use e.g. {DEFAULT_POLL_S} (fast rounds) or {FLOWER_POLL_S:g} (Flower's own polling)",
        )
    return port, retries, warm, poll


def load_node_settings(path: Path, check_port: bool = True) -> NodeSettings:
    """Read and validate `hospital.toml`; every problem is one FedcareError naming file, key and fix."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FedcareError(
            f"no node settings file at {path}", "use the hospital.toml from `fedcare deploy init` (see COMMANDS.md)"
        )
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedcareError(f"{path} is not valid TOML: {exc}", "fix the line named above") from None
    _check_unknown(path, doc)
    reader = _Reader(path, doc)

    address, root, wait = _superlink_section(reader, path)
    key = _private_key(reader)
    port, retries, warm, poll = _node_section(reader, path, check_port)

    dataset = reader.get("data", "dataset", str, True)
    if dataset not in DATA_KEYS:
        raise _err(path, "[data] dataset", f"unknown dataset '{dataset}'", f"choose one of: {', '.join(DATA_KEYS)}")
    config = _data_config(reader, dataset)
    dataset_id = reader.get("data", "dataset-id", str, True)
    if not dataset_id.strip() or _CONTROL.search(dataset_id):
        raise _err(
            path,
            "[data] dataset-id",
            "is empty or holds a control character",
            'name the dataset this node trains on, e.g. "cardiology-ehr-2026"',
        )
    config["dataset-id"] = dataset_id
    config["ledger-dir"] = str(reader.folder_to_create("privacy", "ledger-dir", "ledgers"))
    config |= _privacy_policy(reader)
    config |= _consortium(reader, bool(config["require-secure-aggregation"]))
    digests, store = _code_settings(reader, Path(str(config["ledger-dir"])))
    return NodeSettings(
        path,
        address,
        root,
        key,
        port,
        dataset,
        config,
        retries,
        True if warm is None else warm,
        DEFAULT_POLL_S if poll is None else poll,
        digests,
        store,
        DEFAULT_SUPERLINK_WAIT_S if wait is None else wait,
    )


def _privacy_policy(reader: _Reader) -> dict[str, str | int | float | bool]:
    """[privacy]: the hospital's policy (``client/node_policy.py``), validated, as node config."""
    reader.get("privacy", "epsilon-budget", float, True)  # required: no fallback to a run's epsilon
    kinds = {f.name: f.type for f in dataclasses.fields(NodePolicy)}
    values = {}
    for name, key in NODE_CONFIG_KEYS.items():
        kind = (
            bool if "bool" in kinds[name] else int if "int" in kinds[name] else float if "float" in kinds[name] else str
        )
        value = reader.get("privacy", key, kind)
        if value is not None:
            values[key] = value
    try:
        policy = NodePolicy.from_settings(values)
    except FedcareError as exc:
        raise _err(reader.path, "[privacy]", exc.problem, exc.hint) from None
    return policy.to_node_config()


def _consortium(reader: _Reader, required: bool) -> dict[str, str]:
    """[consortium]: this hospital's roster name, the pinned roster and its own identity key, checked
    against each other now (a node that would refuse every secure round does not start)."""
    if "consortium" not in reader.doc and not required:
        return {}
    from secure_aggregation import SecAggError
    from secure_aggregation.identity import Roster, load_identity_key, public_bytes

    name = reader.get("consortium", "name", str, True)
    roster_path = reader.file("consortium", "roster")
    key_path = reader.file("consortium", "identity-key")
    assert roster_path is not None and key_path is not None
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise _err(
            reader.path,
            "[consortium] identity-key",
            f"{key_path} is readable by other users (mode {mode:04o})",
            f"chmod 600 {key_path}",
        )
    try:
        roster = Roster.load(roster_path)
        key = public_bytes(load_identity_key(key_path))
    except SecAggError as exc:
        raise _err(reader.path, "[consortium]", exc.problem, exc.hint) from None
    if roster.members.get(name) != key:
        raise _err(
            reader.path,
            "[consortium] name",
            f"the roster lists no identity key for {name!r} that matches {key_path}",
            "use the name and key your consortium pinned in the roster",
        )
    return {"secagg-name": name, "secagg-roster": str(roster_path), "secagg-identity-key": str(key_path)}


def _code_settings(reader: _Reader, ledger_dir: Path) -> tuple[tuple[str, ...], Path]:
    """[code]: the FAB digests this node runs, and its approval store (written by `fedcare node approve`)."""
    from fedcare.fab_approval import STORE_NAME, normalize_digest

    digests = []
    for value in reader.get("code", "approved-fabs", list) or []:
        try:
            digests.append(normalize_digest(value if isinstance(value, str) else repr(value)))
        except FedcareError as exc:
            raise _err(reader.path, "[code] approved-fabs", exc.problem, exc.hint) from None
    text = reader.get("code", "approval-store", str)
    store = (reader.base / Path(text).expanduser()).resolve() if text else ledger_dir / STORE_NAME
    return tuple(digests), store


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def format_node_config(config: dict[str, str | int | float | bool]) -> str:
    """`k=v ...` as Flower's `--node-config` parser reads it (TOML values: 'str', 1, 1.5, true)."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise FedcareError(f"node-config key '{key}' is not a bare TOML key", "use letters, digits, '-' and '_'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            value = str(value)
            if _CONTROL.search(value):
                raise FedcareError(f"node-config {key} contains a control character", "rename the path")
            if "'" not in value:
                text = f"'{value}'"  # TOML literal string: no escapes, spaces kept
            elif '"' not in value and "\\" not in value:
                text = f'"{value}"'
            else:
                raise FedcareError(
                    f"node-config {key} = {value!r} mixes quotes Flower's parser cannot carry",
                    "rename the file or folder without ' and \" in its path",
                )
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(
    settings: NodeSettings, executable: str = "flower-supernode", python: str | None = None
) -> list[str]:
    """The SuperNode command for these settings: TLS, node key, loopback Runtime API.

    Flower's `flower-supernode` (``executable``) itself when the node keeps Flower's timing;
    otherwise the same arguments through ``python -m fedcare.node_launcher`` (warm ClientApp
    executor, shorter polls while a run is active), which runs Flower's entry point in-process.
    """
    flower = _flower_args(settings)
    launcher = []
    if settings.warm_clientapp:
        launcher.append("--warm-clientapp")
    if settings.poll_interval < FLOWER_POLL_S:
        launcher += ["--poll-interval", f"{settings.poll_interval:g}"]
    launcher += ["--approved-fabs", str(settings.approved_fabs_store), "--settings", str(settings.path)]
    for digest in settings.approved_fabs:
        launcher += ["--approve", digest]
    return [python or sys.executable, "-m", "fedcare.node_launcher", *launcher, "--", *flower]


def _flower_args(settings: NodeSettings) -> list[str]:
    command = [
        "--superlink",
        settings.superlink_address,
        "--root-certificates",
        str(settings.root_certificates),
        "--auth-supernode-private-key",
        str(settings.private_key),
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.clientappio_port),
        "--node-config",
        format_node_config(settings.node_config),
    ]
    if settings.max_retries is not None:
        command += ["--max-retries", str(settings.max_retries)]
    return command


def check_data(settings: NodeSettings):
    """Load the node's data with the ClientApp's own loader, so bad data fails before the node joins."""
    from client.datasets import load_hospital
    from client.node_config import NodeConfig

    source = NodeConfig.read(settings.node_config, {}, {}).data_source()
    Path(source.cache_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_hospital(settings.dataset, source)
